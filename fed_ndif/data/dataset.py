"""2.5D training data from a site manifest: low-count slice stacks + liver NSTD -> full count.

Manifest: a CSV with columns ``subject,count_level,low_count,full_count,liver_mask,lesion_mask,
split``; paths are relative to the manifest; ``count_level`` is a fraction of full count;
``split`` is train / val / test, assigned by subject.

Every study's volumes are read once, normalized, and kept in memory as float32 (a site of
10 subjects x 5 levels at 96x128x128 is ~360 MB; full-count volumes are shared between a
subject's levels). DataLoader workers inherit them by fork without copying.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.nstd import liver_nstd
from fed_ndif.data.sites import MANIFEST_COLUMNS
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Normalization:
    """SUV -> network units: ``clip(suv, clip_min, clip_max) / scale``; inverse ``x * scale``.

    Defaults: clip at 50 SUV, not 16. Lesions in liver reach SUV 20-30 in the phantoms (and in
    patients), and a clip below them flattens exactly the peaks lesion SUVmax is measured on;
    50 only guards against implausible spikes (bladder, artefacts). ``scale`` = 1 SUV per unit:
    the diffusion noise (unit variance) must be comparable to what the low-count input cannot
    explain (noise and lost detail, a few tenths of an SUV), or the noisy image x_t carries
    information only at the last few percent of timesteps and the network learns to ignore it,
    collapsing every sampler to the smooth posterior mean. With 5 SUV per unit that is what a
    benchmark measured (BENCHMARKS.md, issue 4 section): lesion peaks 24 % low whatever the
    sampler; 1 SUV per unit restored the dependence on x_t. No offset: 0 SUV (air) stays 0,
    and the samplers clamp predicted x0 to ``[clip_min, clip_max] / scale`` (non-negative
    activity). Checkpoints carry it, so inference inverts exactly what training did.
    """

    clip_min: float = 0.0
    clip_max: float = 50.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.clip_max > self.clip_min):
            raise FedNdifError(f"invalid normalization {self}: need scale > 0 and "
                               "clip_max > clip_min")

    def forward(self, suv: np.ndarray) -> np.ndarray:
        return (np.clip(suv, self.clip_min, self.clip_max) / self.scale).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) * self.scale).astype(np.float32)

    @property
    def range(self) -> tuple[float, float]:
        """The normalized range every valid image lies in (used to clamp predicted x0)."""
        return self.clip_min / self.scale, self.clip_max / self.scale

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        return cls(**{k: float(v) for k, v in dict(data).items()})


@dataclass(frozen=True)
class Study:
    """One manifest row, with paths made absolute."""

    subject: str
    count_level: float
    low_count: Path
    full_count: Path
    liver_mask: Path
    lesion_mask: Path | None
    split: str


def read_manifest(path: str | Path) -> list[Study]:
    """Parse and check a site manifest; errors name the file, row and column at fault."""
    path = Path(path)
    if not path.is_file():
        raise FedNdifError(f"{path}: no such manifest file")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FedNdifError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        studies = []
        for line, row in enumerate(reader, start=2):
            try:
                level = float(row["count_level"])
            except ValueError:
                raise FedNdifError(f"{path}:{line}: count_level {row['count_level']!r} is not "
                                   "a number") from None
            if not 0 < level <= 1:
                raise FedNdifError(f"{path}:{line}: count_level must be a fraction in (0, 1], "
                                   f"got {level}")
            if row["split"] not in SPLITS:
                raise FedNdifError(f"{path}:{line}: split must be one of {SPLITS}, "
                                   f"got {row['split']!r}")
            studies.append(Study(
                subject=row["subject"], count_level=level,
                low_count=path.parent / row["low_count"],
                full_count=path.parent / row["full_count"],
                liver_mask=path.parent / row["liver_mask"],
                lesion_mask=path.parent / row["lesion_mask"] if row["lesion_mask"] else None,
                split=row["split"]))
    if not studies:
        raise FedNdifError(f"{path}: the manifest has no studies")
    splits_of: dict[str, set[str]] = {}
    for s in studies:
        splits_of.setdefault(s.subject, set()).add(s.split)
    mixed = sorted(subject for subject, splits in splits_of.items() if len(splits) > 1)
    if mixed:
        raise FedNdifError(f"{path}: subject(s) {', '.join(mixed)} appear in more than one split "
                           "(splits must be by subject)")
    return studies


def stack_indices(z: int, *, k: int, depth: int) -> np.ndarray:
    """Slice indices of the 2k+1 stack around ``z``; at the ends the edge slice is repeated."""
    return np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)


@dataclass
class LoadedStudy:
    study: Study
    low: np.ndarray  # normalized (z, y, x)
    full: np.ndarray  # normalized (z, y, x)
    nstd: float
    affine: np.ndarray


class SliceStackDataset(Dataset):
    """Items: ``{"low": (2k+1, H, W), "nstd": (), "full": (1, H, W)}``, float32 tensors.

    One item per axial slice of every study in the chosen split(s). All studies must share one
    in-plane matrix (training is per site; the networks themselves are size-agnostic).
    """

    def __init__(self, manifest: str | Path, *, split: str | tuple[str, ...] = "train", k: int,
                 normalization: Normalization,
                 count_levels: tuple[float, ...] | list[float] | None = None) -> None:
        self.manifest = Path(manifest)
        self.k = k
        self.normalization = normalization
        splits = (split,) if isinstance(split, str) else tuple(split)
        studies = [s for s in read_manifest(self.manifest) if s.split in splits]
        if count_levels is not None:
            wanted = [float(c) for c in count_levels]
            studies = [s for s in studies
                       if any(abs(s.count_level - c) < 1e-9 for c in wanted)]
        if not studies:
            raise FedNdifError(f"{self.manifest}: no studies in split {'/'.join(splits)}"
                               + (f" at count levels {list(count_levels)}" if count_levels else ""))
        self.studies: list[LoadedStudy] = []
        full_cache: dict[Path, np.ndarray] = {}
        for study in studies:
            low_volume = load_nifti(study.low_count)
            if study.full_count not in full_cache:
                full_cache[study.full_count] = normalization.forward(
                    load_nifti(study.full_count).array)
            full = full_cache[study.full_count]
            if low_volume.array.shape != full.shape:
                raise FedNdifError(f"{study.low_count}: shape {low_volume.array.shape} differs "
                                   f"from its full-count volume {full.shape}")
            liver = load_nifti(study.liver_mask).array
            try:
                nstd = liver_nstd(low_volume.array, liver)
            except FedNdifError as exc:
                raise FedNdifError(f"{study.liver_mask}: {exc}") from None
            self.studies.append(LoadedStudy(
                study=study, low=normalization.forward(low_volume.array), full=full, nstd=nstd,
                affine=low_volume.affine))
        shapes = {s.low.shape[1:] for s in self.studies}
        if len(shapes) > 1:
            raise FedNdifError(f"{self.manifest}: studies have different in-plane matrices "
                               f"{sorted(shapes)}; one site's dataset needs one matrix")
        self.index = [(i, z) for i, s in enumerate(self.studies) for z in range(s.low.shape[0])]
        log.info("%s: %d studies, %d slices (split %s, k=%d)", self.manifest.name,
                 len(self.studies), len(self.index), "/".join(splits), k)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i, z = self.index[item]
        s = self.studies[i]
        idx = stack_indices(z, k=self.k, depth=s.low.shape[0])
        return {"low": torch.from_numpy(np.ascontiguousarray(s.low[idx])),
                "nstd": torch.tensor(s.nstd, dtype=torch.float32),
                "full": torch.from_numpy(np.ascontiguousarray(s.full[z:z + 1]))}
