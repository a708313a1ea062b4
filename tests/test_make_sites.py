"""The ``fed-ndif make-sites`` command: outputs, manifest, determinism and bad configuration."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fed_ndif.cli import main
from fed_ndif.data.manifest import MANIFEST_COLUMNS, OPTIONAL_COLUMNS
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.sites import make_sites
from fed_ndif.data.volume import axial_affine
from fed_ndif.errors import FedNdifError


@pytest.fixture(scope="module")
def tiny_sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sites") / "tiny"
    assert main(["make-sites", str(out), "sites=tiny", "--montage", str(out.parent / "m.png")]) == 0
    return out


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open() as handle:
        return list(csv.DictReader(handle))


def test_writes_three_sites_with_manifests_masks_and_montage(tiny_sites):
    assert (tiny_sites.parent / "m.png").stat().st_size > 10_000
    assert sorted(p.name for p in tiny_sites.iterdir() if p.is_dir()) == [
        "site_a", "site_b", "site_c"]
    for site in ("site_a", "site_b", "site_c"):
        manifest = tiny_sites / site / "manifest.csv"
        rows = _rows(manifest)
        assert tuple(rows[0]) == (*MANIFEST_COLUMNS, *OPTIONAL_COLUMNS)
        splits = {}
        for row in rows:
            assert 0 < float(row["count_level"]) < 1
            for column in ("low_count", "full_count", "liver_mask", "lesion_mask", "ideal"):
                assert (manifest.parent / row[column]).is_file(), row[column]
            splits.setdefault(row["subject"], set()).add(row["split"])
        # Split by subject: one split per subject; every split present.
        assert all(len(s) == 1 for s in splits.values())
        assert {next(iter(s)) for s in splits.values()} == {"train", "val", "test"}
        scanner = json.loads((tiny_sites / site / "scanner.json").read_text())
        volume = load_nifti(manifest.parent / rows[0]["full_count"])
        assert volume.array.shape == (scanner["slices"], scanner["matrix"], scanner["matrix"])
        np.testing.assert_allclose(volume.spacing, (scanner["slice_mm"], scanner["pixel_mm"],
                                                    scanner["pixel_mm"]))
        np.testing.assert_allclose(volume.affine, axial_affine(
            shape_zyx=volume.array.shape, spacing_zyx=volume.spacing))
        liver = load_nifti(manifest.parent / rows[0]["liver_mask"]).array > 0
        lesions = load_nifti(manifest.parent / rows[0]["lesion_mask"]).array
        assert liver.sum() > 10 and lesions.max() >= 1
        assert 1.5 < volume.array[liver].mean() < 3.5  # the liver mask sits on the liver


def test_sites_differ_in_matrix_and_count_levels(tiny_sites):
    shapes, levels = set(), set()
    for site in ("site_a", "site_b", "site_c"):
        rows = _rows(tiny_sites / site / "manifest.csv")
        levels.add(tuple(sorted({r["count_level"] for r in rows})))
        shapes.add(load_nifti(tiny_sites / site / rows[0]["full_count"]).array.shape)
    assert len(shapes) == 3 and len(levels) >= 2


def test_same_seed_gives_identical_files_and_another_seed_does_not(tiny_sites, tmp_path):
    again = tmp_path / "again"
    make_sites(again, overrides=["sites=tiny"])
    reference = _digest(tiny_sites)
    assert _digest(again) == reference
    other = tmp_path / "other"
    make_sites(other, overrides=["sites=tiny", "seed=1", "sites.site_b.subjects=1",
                                 "sites.site_c.subjects=1"])
    assert _digest(other)["site_a/sub-001/full_count.nii.gz"] != reference[
        "site_a/sub-001/full_count.nii.gz"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sites.site_a.count_levels=[-0.1,0.5]", "count_levels"),
        ("sites.site_b.count_levels=[1.5]", "count_levels"),
        ("sites=no_such_profile", "no_such_profile"),
        ("sites/site_a/scanner@sites.site_a.scanner=nope", "nope"),
        ("sites.site_a.scanner.matrix=20", "too small for the anatomy"),
        ("sites.site_c.scanner.slices=4", "too small"),
        ("sites.site_a.subjects=0", "subjects"),
        ("sites.site_a.scanner.psf_fwhm_mm=-2", "psf_fwhm_mm"),
    ],
)
def test_bad_configuration_is_one_clear_error_and_writes_nothing(tmp_path, capsys, override,
                                                                 message):
    out = tmp_path / "out"
    assert main(["make-sites", str(out), "sites=tiny", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced_whole_with_overwrite(tmp_path, capsys):
    out = tmp_path / "sites"
    out.mkdir()
    (out / "stray.txt").write_text("somebody else's file")
    assert main(["make-sites", str(out), "sites=tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "stray.txt").exists()
    make_sites(out, overrides=["sites=tiny", "sites.site_a.subjects=1", "sites.site_b.subjects=1",
                               "sites.site_c.subjects=1"], overwrite=True)
    assert not (out / "stray.txt").exists()  # never silently mixed with older content
    assert (out / "site_a" / "manifest.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["sites"]  # no staging folders left


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import fed_ndif.data.sites as sites

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sites, "write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        make_sites(tmp_path / "out", overrides=["sites=tiny", "sites.site_a.subjects=1",
                                                 "sites.site_b.subjects=1",
                                                 "sites.site_c.subjects=1"])
    assert list(tmp_path.iterdir()) == []


def test_splits_hold_out_whole_subjects():
    from fed_ndif.data.sites import assign_splits

    assert assign_splits(10, val_fraction=0.2, test_fraction=0.2).count("test") == 2
    assert assign_splits(3, val_fraction=0.2, test_fraction=0.2) == ["train", "val", "test"]
    assert assign_splits(1, val_fraction=0.2, test_fraction=0.2) == ["train"]
    with pytest.raises(FedNdifError):
        assign_splits(5, val_fraction=0.6, test_fraction=0.5)
