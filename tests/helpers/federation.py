"""The tiny three-site federation the in-process federation tests share."""

from __future__ import annotations

from pathlib import Path

from fed_ndif.config import load_config
from fed_ndif.data.sites import make_sites
from fed_ndif.run_config import to_run_config

SITES = ["site_a", "site_b", "site_c"]


def tiny_sites(root: Path) -> Path:
    make_sites(root, overrides=["sites=tiny"])
    return root


def tiny_run_config(sites_root: Path, run_dir: Path, *extra: str) -> dict:
    """Flower's flat run config of a 2-round tiny federation over the three tiny sites."""
    cfg = load_config("federated", [
        "model=tiny", "fl.rounds=2", "fl.local_steps=2", "train.batch_size=4",
        "fl.evaluate_max_studies=0", f"data.root={sites_root}", f"data.sites=[{','.join(SITES)}]",
        f"run_dir={run_dir}", "logger.wandb_mode=disabled", *extra])
    return to_run_config(cfg)
