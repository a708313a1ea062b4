"""2.5D dataset over a site manifest: stacks, edges, NSTD, splits, normalization, workers."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fed_ndif.data.dataset import SliceStackDataset, held_out_levels, stack_indices
from fed_ndif.data.manifest import read_manifest
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.normalization import Normalization
from fed_ndif.data.nstd import find_liver_voi, liver_nstd
from fed_ndif.errors import FedNdifError
from tests.helpers.synthetic import write_site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_site(tmp_path_factory.mktemp("site"), splits=("train", "train", "val"),
                      levels=(0.1, 0.5), matrix=40, slices=16)


def test_stack_indices_repeat_edge_slices():
    assert stack_indices(0, k=2, depth=10).tolist() == [0, 0, 0, 1, 2]
    assert stack_indices(9, k=1, depth=10).tolist() == [8, 9, 9]
    assert stack_indices(4, k=0, depth=10).tolist() == [4]


def test_items_hold_stack_nstd_and_centre_slice(site):
    norm = Normalization()
    ds = SliceStackDataset(site, split="train", k=2, normalization=norm, count_levels=[0.1])
    assert len(ds.studies) == 2 and len(ds) == 2 * 16
    item = ds[0]  # study 0, slice 0
    assert item["low"].shape == (5, 40, 40) and item["full"].shape == (1, 40, 40)
    assert item["low"].dtype == torch.float32 and item["nstd"].shape == ()
    study = ds.studies[0].study
    low = load_nifti(study.low_count).array
    full = load_nifti(study.full_count).array
    np.testing.assert_allclose(item["low"][0].numpy(), norm.forward(low[0]))  # edge repeated
    np.testing.assert_allclose(item["low"][2].numpy(), norm.forward(low[0]))
    np.testing.assert_allclose(item["low"][4].numpy(), norm.forward(low[2]))
    np.testing.assert_allclose(item["full"][0].numpy(), norm.forward(full[0]))
    expected = liver_nstd(low, load_nifti(study.liver_mask).array)
    assert item["nstd"].item() == pytest.approx(expected, rel=1e-6)


def test_splits_are_by_subject_and_levels_filter(site):
    norm = Normalization()
    train = SliceStackDataset(site, split="train", k=1, normalization=norm)
    val = SliceStackDataset(site, split="val", k=1, normalization=norm)
    train_subjects = {s.study.subject for s in train.studies}
    val_subjects = {s.study.subject for s in val.studies}
    assert train_subjects == {"sub-001", "sub-002"} and val_subjects == {"sub-003"}
    assert len(train.studies) == 4  # two count levels each
    with pytest.raises(FedNdifError, match="count levels"):
        SliceStackDataset(site, split="val", k=1, normalization=norm, count_levels=[0.25])


def test_a_held_out_level_stays_out_of_the_named_site_only(site):
    data = {"held_out_levels": [{"site": site.parent.name, "levels": [0.5]}]}
    assert held_out_levels(data, site.parent.name) == (0.5,)
    assert held_out_levels(data, "another_site") == () == held_out_levels({}, "x")
    kept = SliceStackDataset(site, split="train", k=1, normalization=Normalization(),
                             exclude_levels=held_out_levels(data, site.parent.name))
    assert {s.study.count_level for s in kept.studies} == {0.1} and len(kept.studies) == 2
    with pytest.raises(FedNdifError, match=r"data.held_out_levels.*site: NAME"):
        held_out_levels({"held_out_levels": [{"site_a": [0.5]}]}, "site_a")


def test_lower_count_has_higher_nstd(site):
    ds = SliceStackDataset(site, split="val", k=0, normalization=Normalization())
    by_level = {s.study.count_level: s.nstd for s in ds.studies}
    assert by_level[0.1] > by_level[0.5]


def test_normalization_round_trip_clip_and_dict():
    norm = Normalization(clip_min=0.0, clip_max=40.0, scale=4.0)
    suv = np.array([-1.0, 0.0, 2.5, 39.0, 70.0], np.float32)
    np.testing.assert_allclose(norm.inverse(norm.forward(suv)), [0, 0, 2.5, 39.0, 40.0])
    assert norm.range == (0.0, 10.0)
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(FedNdifError):
        Normalization(scale=0.0)


def _rewrite(manifest, tmp_path, change) -> object:
    rows = list(csv.DictReader(manifest.open()))
    fields = list(rows[0])
    rows, fields = change(rows, fields)
    out = tmp_path / "manifest.csv"
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    # paths are relative to the manifest: keep the same folder
    target = manifest.parent / f"bad_{tmp_path.name}.csv"
    target.write_text(out.read_text())
    return target


@pytest.mark.parametrize(("change", "message"), [
    (lambda r, f: ([{k: v for k, v in x.items() if k != "full_count"} for x in r],
                   [c for c in f if c != "full_count"]), "lacks column"),
    (lambda r, f: ([{**x, "low_count": ""} for x in r], f), "low_count are blank"),
    (lambda r, f: ([{**x, "split": "holdout"} for x in r], f), "split must be"),
    (lambda r, f: ([{**x, "count_level": "ten"} for x in r], f), "not a number"),
    (lambda r, f: ([{**x, "count_level": "10"} for x in r], f), "fraction"),
    (lambda r, f: ([{**x, "split": "train" if i == 0 else x["split"]} for i, x in enumerate(r)]
                   + [{**r[0], "split": "val"}], f), "more than one split"),
])
def test_bad_manifests_are_named(site, tmp_path, change, message):
    bad = _rewrite(site, tmp_path, change)
    with pytest.raises(FedNdifError, match=message) as info:
        read_manifest(bad)
    assert bad.name in str(info.value)


def test_the_noise_free_column_is_optional(site, tmp_path):
    assert all(s.ideal is None for s in read_manifest(site))  # no such column
    with_column = _rewrite(site, tmp_path, lambda r, f: (
        [{**x, "ideal": "ideal.nii.gz" if i == 0 else ""} for i, x in enumerate(r)],
        [*f, "ideal"]))
    studies = read_manifest(with_column)
    assert studies[0].ideal == with_column.parent / "ideal.nii.gz"
    assert all(s.ideal is None for s in studies[1:])  # blank: no reference for that study


@pytest.mark.parametrize("absent", [False, True], ids=["blank", "no-columns"])
def test_masks_are_optional_and_the_automatic_liver_voi_gives_nstd(tmp_path, absent):
    # Long enough (48 x 14 mm) for the automatic liver VOI to find the liver.
    site = write_site(tmp_path / "site", splits=("train",), levels=(0.25,), matrix=48, slices=48)
    masked = SliceStackDataset(site, split="train", k=1, normalization=Normalization())
    bare = _rewrite(site, tmp_path, lambda r, f: (
        ([{k: v for k, v in x.items() if k not in ("liver_mask", "lesion_mask")} for x in r],
         [c for c in f if c not in ("liver_mask", "lesion_mask")]) if absent else
        ([{**x, "liver_mask": "", "lesion_mask": ""} for x in r], f)))
    study = read_manifest(bare)[0]
    assert study.liver_mask is None and study.lesion_mask is None
    ds = SliceStackDataset(bare, split="train", k=1, normalization=Normalization())
    # The VOI is found on the full-count scan and measured on the low-count input.
    voi = find_liver_voi(load_nifti(study.full_count))
    low = load_nifti(study.low_count).array
    assert ds.studies[0].nstd == pytest.approx(liver_nstd(low, voi, erode=0), rel=1e-6)
    assert ds.studies[0].nstd == pytest.approx(masked.studies[0].nstd, rel=0.15)
    assert len(ds.studies[0].foreground) > 0  # the hottest voxels stand in for lesions


def test_missing_manifest_and_volume_are_named(site, tmp_path):
    with pytest.raises(FedNdifError, match="no such manifest"):
        read_manifest(tmp_path / "nope.csv")
    bad = _rewrite(site, tmp_path, lambda r, f: ([{**x, "low_count": "gone.nii.gz"} for x in r],
                                                 f))
    with pytest.raises(FedNdifError, match=r"gone\.nii\.gz"):
        SliceStackDataset(bad, split="val", k=1, normalization=Normalization())


def test_dataloader_workers_give_the_same_batches(site):
    ds = SliceStackDataset(site, split="val", k=1, normalization=Normalization())
    batches = [next(iter(DataLoader(ds, batch_size=4, num_workers=w))) for w in (0, 2)]
    for key in ("low", "nstd", "full"):
        torch.testing.assert_close(batches[0][key], batches[1][key], rtol=0, atol=0)
