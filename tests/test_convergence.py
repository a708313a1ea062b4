"""The plateau check behind the report's training curves."""

import math

from fed_ndif.evaluation.convergence import (
    federation_curve,
    last_quarter_gain,
    plateau_table,
    trainer_curve,
)


def _curve(values):
    return [{"step": float(100 * (i + 1)), "val_psnr": v, "train_loss": math.nan}
            for i, v in enumerate(values)]


def test_a_rising_curve_is_not_a_plateau_and_a_flat_one_is():
    rising = _curve([30.0, 31.0, 32.0, 33.0, 33.5, 34.0, 34.5, 35.0])
    flat = _curve([30.0, 33.0, 34.0, 34.2, 34.25, 34.2, 34.3, 34.28])
    # The last quarter (steps > 600) holds 700 and 800; the best before it is step 600's.
    assert math.isclose(last_quarter_gain(rising), 35.0 - 34.0)
    assert math.isclose(last_quarter_gain(flat), 34.3 - 34.25)
    table = plateau_table({"rising": rising, "flat": flat})
    assert "| rising | 8 | 800 | 35.00 | +1.00 | no, still rising |" in table
    assert "| flat | 8 | 800 | 34.30 | +0.05 | yes |" in table


def test_a_late_dip_is_not_called_a_gain_and_missing_validation_gives_no_verdict():
    assert last_quarter_gain(_curve([30.0, 34.0, 34.0, 33.0])) < 0
    assert last_quarter_gain(_curve([math.nan, math.nan, 31.0])) is None  # nothing before
    assert last_quarter_gain([]) is None
    assert "| none | 0 | 200 | – | – | – |" in plateau_table({"none": _curve([math.nan] * 2)})


def test_every_curve_counts_optimizer_steps_per_site():
    rounds = [{"round": r, "train": {"train_loss": 0.1}, "evaluate": {"val_psnr": 30.0 + r}}
              for r in (1, 2)]
    assert [p["step"] for p in federation_curve(rounds, local_steps=50)] == [50.0, 100.0]
    records = [{"step": 300, "loss": 0.2, "val_psnr": 31.0}, {"step": 600, "loss": 0.1}]
    pooled = trainer_curve(records, sites=3)
    assert [p["step"] for p in pooled] == [100.0, 200.0]
    assert math.isnan(pooled[1]["val_psnr"]) and pooled[1]["train_loss"] == 0.1
    finetuned = trainer_curve(records[:1], start=1000)
    assert finetuned[0]["step"] == 1300.0
