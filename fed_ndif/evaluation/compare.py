"""Evaluate denoising methods on a site's held-out test studies: one row per study and method.

A method is a callable ``TestStudy -> SUV volume``; the low-count input, the noise-free
reference, the tuned filters and every trained checkpoint are wrapped the same way, so each is
scored on exactly the same studies with exactly the same metrics.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_ndif.checkpoints import load_checkpoint, sampler_config
from fed_ndif.data.dataset import split_studies
from fed_ndif.data.manifest import Study
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.nstd import check_nstd, find_liver_voi, liver_nstd
from fed_ndif.data.resolution import site_resolution
from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError
from fed_ndif.evaluation.detectability import (
    DETECTION_CSV,
    DetectionTask,
    score_detection,
    write_detection,
)
from fed_ndif.evaluation.filters import TunedFilter, tune_filter
from fed_ndif.evaluation.lesions import LesionSet, lesion_metrics, summarize_lesions, summary_keys
from fed_ndif.evaluation.report import write_report
from fed_ndif.evaluation.texture import KEYS as TEXTURE_KEYS
from fed_ndif.evaluation.texture import texture_metrics
from fed_ndif.image_metrics import volume_metrics
from fed_ndif.models.body import body_mask
from fed_ndif.models.denoise_volume import denoise_volume, resolve_device
from fed_ndif.models.engines import available_threads, choose_engine, inference_network

log = logging.getLogger(__name__)

INPUT_LABEL = "Low-count input"

NOISE_FREE_LABEL = "Noise-free reconstruction (reference)"


@dataclass
class TestStudy:
    """A held-out study as evaluation sees it: SUV volumes, masks and voxel spacing.

    ``liver`` is the manifest's liver mask or, when it is blank, the automatic liver VOI found
    on the full-count scan, as training finds it (one VOI for every method, so their liver
    NSTDs compare, and the model's input NSTD is the one it was trained with).
    """

    study: Study
    low: np.ndarray
    full: np.ndarray
    liver: np.ndarray
    lesions: np.ndarray | None
    spacing: tuple[float, float, float]
    ideal: np.ndarray | None = None  # noise-free reconstruction, where the site has one
    affine: np.ndarray | None = None
    automatic_liver: bool = False
    fwhm_mm: tuple[float, float, float] | None = None  # the site's resolution, where known

    @functools.cached_property
    def nstd(self) -> float:
        """The input's NSTD, what the models are conditioned on (checked when automatic)."""
        nstd = self.liver_nstd(self.low)
        if self.automatic_liver:
            check_nstd(nstd, "automatic liver VOI")
        return nstd

    def liver_nstd(self, volume: np.ndarray) -> float:
        """NSTD of ``volume`` in this study's liver (an automatic VOI is used as found)."""
        return liver_nstd(volume, self.liver, erode=0 if self.automatic_liver else 1)


Denoiser = Callable[[TestStudy], np.ndarray]


@dataclass(frozen=True)
class Method:
    name: str  # machine name, e.g. fedndif_personalized
    label: str  # what the report calls it
    denoise: Denoiser


def input_method() -> Method:
    return Method("input", INPUT_LABEL, lambda study: study.low)


def noise_free_method() -> Method:
    """The physical best a denoiser of this scanner could return, scored like any method."""
    return Method("noise_free", NOISE_FREE_LABEL, lambda study: study.ideal)


def filter_method(tuned: TunedFilter, label: str) -> Method:
    return Method(tuned.name, f"{label} ({tuned.parameter}={tuned.value:g})",
                  lambda study: tuned.apply(study.low, study.spacing))


def checkpoint_method(name: str, label: str, checkpoint: Path, *, device: str = "cpu",
                      seed: int = 0, steps: int | None = None) -> Method:
    """A trained model (diffusion: its own sampler settings; U-Net: one pass), EMA weights."""
    state = load_checkpoint(checkpoint, device=device)
    overrides = {"steps": steps} if steps else {}
    sampler = sampler_config(state.cfg, **overrides) if state.process is not None else None
    engine = choose_engine("auto", device=resolve_device(device), precision="fp32")
    network = inference_network(state.ema.model, engine=engine, threads=available_threads())

    def run(study: TestStudy) -> np.ndarray:
        mean, _ = denoise_volume(network, study.low, nstd=study.nstd,
                                 normalization=state.normalization, k=state.k,
                                 process=state.process, sampler=sampler, device=device,
                                 window=state.window, seed=seed, progress=False)
        return mean

    return Method(name, label, run)


def load_studies(manifest: Path, split: str, *, count_levels: Sequence[float] | None = None,
                 max_subjects: int | None = None) -> list[TestStudy]:
    studies = split_studies(manifest, (split,), count_levels=count_levels or None)
    if max_subjects:
        keep = sorted({s.subject for s in studies})[:max_subjects]
        studies = [s for s in studies if s.subject in keep]
    shared: dict[Path, np.ndarray] = {}
    vois: dict[Path, np.ndarray] = {}
    resolution = site_resolution(Path(manifest).parent)

    def subject_volume(path: Path) -> np.ndarray:
        """A subject's full count, masks and noise-free image serve all its count levels."""
        if path not in shared:
            shared[path] = load_nifti(path).array
        return shared[path]

    def automatic_voi(study: Study, affine: np.ndarray) -> np.ndarray:
        if study.full_count not in vois:
            try:
                vois[study.full_count] = find_liver_voi(
                    Volume(subject_volume(study.full_count), affine))
            except FedNdifError as exc:
                raise FedNdifError(f"{study.full_count}: {exc}") from None
        return vois[study.full_count]

    loaded = []
    for study in studies:
        low = load_nifti(study.low_count)
        auto = study.liver_mask is None
        loaded.append(TestStudy(
            study=study, low=low.array, full=subject_volume(study.full_count),
            liver=(automatic_voi(study, low.affine) if auto
                   else subject_volume(study.liver_mask) > 0),
            lesions=(subject_volume(study.lesion_mask).astype(np.int32)
                     if study.lesion_mask else None),
            spacing=low.spacing,
            ideal=subject_volume(study.ideal) if study.ideal else None,
            affine=low.affine, automatic_liver=auto, fwhm_mm=resolution))
    return loaded


def tuned_filters(manifest: Path) -> list[Method]:
    """Gaussian and NLM, each tuned on the site's validation split (all its count levels)."""
    val = [(s.low, s.full, s.spacing) for s in load_studies(manifest, "val")]
    return [filter_method(tune_filter("gaussian", val), "Gaussian filter"),
            filter_method(tune_filter("nlm", val), "Non-local means")]


def score_methods(site: str, studies: list[TestStudy], methods: list[Method], *,
                  keep_outputs: Callable[[TestStudy], bool] | None = None
                  ) -> tuple[list[dict], dict]:
    """Rows of metrics (site, subject, level, method) and, for studies ``keep_outputs`` selects,
    the output volumes by (subject, level, method) for figures. A method that needs what a
    study lacks (the noise-free reference of real data) is skipped for it."""
    rows, outputs = [], {}
    for study in studies:
        reference_nstd = study.liver_nstd(study.full)
        texture_masks = {"liver": study.liver > 0, "body": body_mask(study.full, margin_px=0)}
        lesion_set = reference = ideal = None
        if study.lesions is not None:
            lesion_set = LesionSet(study.lesions, study.spacing, study.full,
                                   fwhm_mm=study.fwhm_mm)
            reference = lesion_set.uptake(study.full)
            ideal = lesion_set.uptake(study.ideal) if study.ideal is not None else None
        for method in methods:
            out = method.denoise(study)
            if out is None:
                continue
            row = {"site": site, "subject": study.study.subject,
                   "count_level": study.study.count_level, "method": method.name,
                   "label": method.label, **volume_metrics(out, study.full),
                   "liver_nstd": study.liver_nstd(out),
                   "full_count_liver_nstd": reference_nstd}
            if lesion_set is not None:
                row.update(summarize_lesions(lesion_metrics(
                    lesion_set, lesion_set.uptake(out), reference, ideal)))
            if study.ideal is not None:
                row.update(texture_metrics(out, study.full, study.ideal, masks=texture_masks,
                                           spacing_yx=tuple(study.spacing[1:])))
            rows.append(row)
            if keep_outputs is not None and keep_outputs(study):
                outputs[(study.study.subject, study.study.count_level, method.name)] = out
            log.info("%s %s %g%% %s: body PSNR %.2f dB", site, study.study.subject,
                     100 * study.study.count_level, method.name, row["psnr"])
    return rows, outputs


TEXT_FIELDS = ("site", "subject", "method", "label")
FIELDS = ("site", "subject", "count_level", "method", "label", "psnr", "ssim", "nmse",
          "psnr_field", "ssim_field", "nmse_field", "liver_nstd", "full_count_liver_nstd",
          *summary_keys(), *TEXTURE_KEYS,
          "seed")  # seed: empty for one run, or a method that does not train


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in FIELDS:
            if key not in TEXT_FIELDS:
                # A metric that does not apply (no lesion large enough) is written empty.
                row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
    return rows


def evaluate_site(manifest: Path, out_dir: Path, *, models: dict[str, Path],
                  filters: bool = True, split: str = "test", device: str = "cpu",
                  overwrite: bool = False, reference: str | None = None,
                  count_levels: Sequence[float] | None = None,
                  detection: DetectionTask | None = None) -> Path:
    """``fed-ndif evaluate``: a site scores its own models (and the classical baselines) on
    its held-out studies; writes metrics.csv, figures and report.md into ``out_dir``, with
    every method's paired difference to ``reference`` (one of ``models``) when given, and
    with ``detection`` the model observer's detectability (detection.csv)."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FedNdifError(f"{out_dir} is not empty; choose a new folder or pass --overwrite")
    if reference is not None and reference not in models:
        raise FedNdifError(f"--reference {reference}: not one of the --model names "
                           f"({', '.join(models) or 'none given'})")
    for name, path in models.items():
        if not Path(path).is_file():
            raise FedNdifError(f"--model {name}={path}: no such checkpoint")
    site = manifest.parent.name
    studies = load_studies(manifest, split, count_levels=count_levels)
    if not studies:
        raise FedNdifError(f"{manifest}: no studies in split {split}"
                           + (f" at count levels {list(count_levels)}" if count_levels else ""))
    methods = [input_method()]
    if any(s.ideal is not None for s in studies):
        methods.append(noise_free_method())
    if filters:
        methods += tuned_filters(manifest)
    methods += [checkpoint_method(name, name, Path(path), device=device)
                for name, path in models.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    rows, _ = score_methods(site, studies, methods)
    write_rows(out_dir / "metrics.csv", rows)
    detected = score_detection(site, studies, methods, detection) if detection else []
    if detected:
        write_detection(out_dir / DETECTION_CSV, detected)
    notes = [f"Site {site}, split {split}; models: "
             + ", ".join(f"{n} = {p}" for n, p in models.items())]
    return write_report(out_dir, rows, [m.name for m in methods], curves={}, figures=[],
                        reference=reference, notes=notes, detection=detected)
