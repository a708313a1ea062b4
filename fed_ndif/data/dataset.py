"""2.5D training data from a site manifest: low-count slice stacks + liver NSTD -> full count.

The site is described by its manifest (:mod:`fed_ndif.data.manifest`).

Every study's volumes are read once, normalized, and kept in memory as float32 (a site of
10 subjects x 5 levels at 96x128x128 is ~360 MB; full-count volumes are shared between a
subject's levels). DataLoader workers inherit them by fork without copying.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fed_ndif.data.manifest import Study, at_level, read_manifest
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.normalization import Normalization
from fed_ndif.data.nstd import check_nstd, find_liver_voi, liver_nstd
from fed_ndif.data.resolution import site_resolution
from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

# Without a lesion mask, the hottest voxels of the full-count image stand in for "foreground"
# when patches are oversampled (lesions, and physiological uptake of the same intensity).
HOT_QUANTILE = 0.999


def held_out_levels(data: dict, site: str) -> tuple[float, ...]:
    """The count levels an experiment keeps out of ``site``'s training and validation
    (``data.held_out_levels``: a list of ``{site: NAME, levels: [...]}``; a list, not a
    mapping, so that it travels through Flower's run config as one value), to see whether the
    noise embedding carries to a level the site never trained on."""
    levels: list[float] = []
    for entry in data.get("held_out_levels") or []:
        try:
            if entry["site"] == site:
                levels += [float(c) for c in entry["levels"]]
        except (TypeError, KeyError, ValueError):
            raise FedNdifError(f"data.held_out_levels: {entry!r} is not {{site: NAME, levels: "
                               "[FRACTION, ...]}") from None
    return tuple(levels)


def split_studies(manifest: Path, splits: tuple[str, ...], *,
                  count_levels: tuple[float, ...] | list[float] | None = None,
                  exclude_levels: tuple[float, ...] = ()) -> list[Study]:
    """The manifest's studies in ``splits`` at ``count_levels`` (None: all), without
    ``exclude_levels``; reads no volume."""
    return [s for s in read_manifest(manifest) if s.split in splits
            and (count_levels is None or at_level(s.count_level, count_levels))
            and not at_level(s.count_level, exclude_levels)]


def stack_indices(z: int, *, k: int, depth: int) -> np.ndarray:
    """Slice indices of the 2k+1 stack around ``z``; at the ends the edge slice is repeated."""
    return np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)


@dataclass
class NormalizedStudy:
    """A study as training sees it: normalized volumes in memory and the input's liver NSTD."""

    study: Study
    low: np.ndarray  # normalized (z, y, x)
    full: np.ndarray  # normalized (z, y, x)
    nstd: float
    affine: np.ndarray
    spacing: tuple[float, float, float]  # voxel size in mm (z, y, x)
    # Shared by the studies of one dataset: a subject's count levels share one full count and
    # one lesion mask, so they share one foreground.
    foregrounds: dict[tuple[Path, Path | None], np.ndarray] = field(default_factory=dict,
                                                                    repr=False)

    @property
    def foreground(self) -> np.ndarray:
        """(n, 3) int32 (z, y, x): lesion voxels, else the hottest voxels. Found on first use
        (only patch training with foreground oversampling needs them), once per subject."""
        key = (self.study.full_count, self.study.lesion_mask)
        if key not in self.foregrounds:
            self.foregrounds[key] = self._find_foreground()
        return self.foregrounds[key]

    def _find_foreground(self) -> np.ndarray:
        if self.study.lesion_mask is not None:
            lesions = load_nifti(self.study.lesion_mask).array
            if lesions.shape == self.full.shape and lesions.max() > 0:
                return np.argwhere(lesions > 0).astype(np.int32)
        return np.argwhere(self.full >= np.quantile(self.full, HOT_QUANTILE)).astype(np.int32)


def study_nstd(study: Study, low: Volume, full: Volume, *,
               vois: dict[Path, np.ndarray] | None = None) -> float:
    """The liver NSTD of a study's low-count input, in its liver mask or, when the manifest
    leaves the mask blank, in the automatic liver VOI. The VOI is found on the full-count
    scan: noise at low counts can hide the liver from the finder, and one VOI then serves
    every count level of the study (``fed-ndif denoise``, without a full count, finds it on
    its input). ``vois``: VOIs already found, by full-count path (filled here)."""
    vois = {} if vois is None else vois
    try:
        if study.liver_mask is None:
            if study.full_count not in vois:
                vois[study.full_count] = find_liver_voi(full)
            nstd = liver_nstd(low.array, vois[study.full_count], erode=0)
            check_nstd(nstd, "automatic liver VOI")
            return nstd
        return liver_nstd(low.array, load_nifti(study.liver_mask).array)
    except FedNdifError as exc:
        where = study.liver_mask or study.full_count
        raise FedNdifError(f"{where}: {exc}") from None


class SliceStackDataset(Dataset):
    """Items: ``{"low": (2k+1, H, W), "nstd": (), "full": (1, H, W), "spacing": (3,),
    "full_stack": (2k+1, H, W), "fwhm": (3,), "count_level": ()}``, float32 tensors
    (``spacing``: voxel size in mm, z, y, x; ``full_stack``: the full count at ``low``'s slices;
    ``fwhm``: the site's resolution in mm, z, y, x, zeros where its folder does not state it).

    One item per axial slice of every study in the chosen split(s): ``dataset[j]`` is slice
    ``j`` whole, ``dataset[(j, y0, x0, size)]`` its ``size`` x ``size`` patch at (y0, x0)
    (what patch training asks for). All studies must share one in-plane matrix (training is
    per site; the networks themselves are size-agnostic).
    """

    def __init__(self, manifest: str | Path, *, split: str | tuple[str, ...] = "train", k: int,
                 normalization: Normalization,
                 count_levels: tuple[float, ...] | list[float] | None = None,
                 exclude_levels: tuple[float, ...] = ()) -> None:
        self.manifest = Path(manifest)
        self.k = k
        self.normalization = normalization
        splits = (split,) if isinstance(split, str) else tuple(split)
        studies = split_studies(self.manifest, splits, count_levels=count_levels,
                                exclude_levels=exclude_levels)
        if not studies:
            raise FedNdifError(f"{self.manifest}: no studies in split {'/'.join(splits)}"
                               + (f" at count levels {list(count_levels)}" if count_levels else ""))
        self.studies: list[NormalizedStudy] = []
        full_cache: dict[Path, tuple[Volume, np.ndarray]] = {}
        vois: dict[Path, np.ndarray] = {}
        foregrounds: dict[tuple[Path, Path | None], np.ndarray] = {}
        for study in studies:
            low_volume = load_nifti(study.low_count)
            if study.full_count not in full_cache:
                raw = load_nifti(study.full_count)
                full_cache[study.full_count] = raw, normalization.forward(raw.array)
            raw_full, full = full_cache[study.full_count]
            if low_volume.array.shape != full.shape:
                raise FedNdifError(f"{study.low_count}: shape {low_volume.array.shape} differs "
                                   f"from its full-count volume {full.shape}")
            nstd = study_nstd(study, low_volume, raw_full, vois=vois)
            self.studies.append(NormalizedStudy(
                study=study, low=normalization.forward(low_volume.array), full=full, nstd=nstd,
                affine=low_volume.affine, spacing=low_volume.spacing, foregrounds=foregrounds))
        shapes = {s.low.shape[1:] for s in self.studies}
        if len(shapes) > 1:
            raise FedNdifError(f"{self.manifest}: studies have different in-plane matrices "
                               f"{sorted(shapes)}; one site's dataset needs one matrix")
        resolution = site_resolution(self.manifest.parent)
        if resolution is None:
            log.info("%s: no %s beside it states the site's resolution; lesion insertion uses "
                     "train.insert_lesions.fwhm_mm", self.manifest.name, "scanner.json")
        self.fwhm = torch.tensor(resolution or (0.0, 0.0, 0.0), dtype=torch.float32)
        self.index = [(i, z) for i, s in enumerate(self.studies) for z in range(s.low.shape[0])]
        self._first = np.cumsum([0] + [s.low.shape[0] for s in self.studies])[:-1].tolist()
        log.info("%s: %d studies, %d slices (split %s, k=%d)", self.manifest.name,
                 len(self.studies), len(self.index), "/".join(splits), k)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(self.studies[0].low.shape[1:])  # type: ignore[return-value]

    def slice_of(self, study: int, z: int) -> int:
        """The item index of slice ``z`` of study ``study``."""
        return self._first[study] + z

    def __getitem__(self, item: int | tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        if isinstance(item, tuple):
            item, y0, x0, size = item
            window = (slice(y0, y0 + size), slice(x0, x0 + size))
        else:
            window = (slice(None), slice(None))
        i, z = self.index[item]
        s = self.studies[i]
        idx = stack_indices(z, k=self.k, depth=s.low.shape[0])
        # One fancy index with the crop: a patch copies only the patch, not whole slices.
        return {"low": torch.from_numpy(np.ascontiguousarray(s.low[(idx, *window)])),
                "nstd": torch.tensor(s.nstd, dtype=torch.float32),
                "full": torch.from_numpy(np.ascontiguousarray(s.full[(slice(z, z + 1), *window)])),
                "spacing": torch.tensor(s.spacing, dtype=torch.float32),
                "full_stack": torch.from_numpy(np.ascontiguousarray(s.full[(idx, *window)])),
                "fwhm": self.fwhm,
                "count_level": torch.tensor(s.study.count_level, dtype=torch.float32)}
