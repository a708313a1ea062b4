"""Denoise one PET study with a trained checkpoint: the ``fed-ndif denoise`` command.

Flower-free: a clinician's workstation or a research pipeline needs only the checkpoint. The
input is a PET DICOM series (picked as :func:`fed_ndif.data.dicom.read_pet_series` picks it) or
an SUV NIfTI volume; the output is a derived PET series in the input's study and/or NIfTI (layout
in ``docs/denoise.md``). Everything that can be checked is checked before any sampling starts
(paths, output location, checkpoint), and the output appears atomically: it is assembled in a
hidden sibling folder and renamed into place only when complete, so a failure or an interrupt
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import fed_ndif
from fed_ndif.checkpoints import (
    TrainingState,
    check_for_inference,
    load_checkpoint,
    read_checkpoint,
    sampler_config,
)
from fed_ndif.data.dicom import (
    PetSeriesInfo,
    check_weight_and_dose,
    read_pet_series,
    write_pet_series,
)
from fed_ndif.data.dicom.derived import derived_reason
from fed_ndif.data.nifti import load_nifti, save_nifti
from fed_ndif.data.nstd import measure_liver_nstd
from fed_ndif.data.volume import Volume
from fed_ndif.errors import FedNdifError
from fed_ndif.models.denoise_volume import denoise_volume, resolve_device
from fed_ndif.models.engines import available_threads, choose_engine, inference_network
from fed_ndif.models.sampling import SamplerConfig
from fed_ndif.staging import staged_file, staged_folder

log = logging.getLogger(__name__)

SAMPLER_LABELS = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp_2m": "DPM-Solver++(2M)"}

FORMATS = ("dicom", "nifti", "both")
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
DEVICES = ("auto", "cpu", "cuda")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Names inside an OUTPUT folder (formats dicom and both).
DENOISED_SERIES = "denoised"
UNCERTAINTY_SERIES = "uncertainty"
DENOISED_NIFTI = "denoised.nii.gz"
UNCERTAINTY_NIFTI = "uncertainty.nii.gz"
# Largest affine difference (mm) between a liver mask and the volume.
MASK_AFFINE_TOLERANCE_MM = 1e-2


@dataclass
class DenoiseResult:
    """What was done; :meth:`summary` is the text the command prints."""

    input_description: str
    nstd: float
    nstd_source: str
    sampler: str  # e.g. "DDIM, 10 steps x 1 sample" or "U-Net (deterministic)"
    checkpoint: str
    device: str
    precision: str
    engine: str  # "torch" or "onnxruntime", and the threads it ran on
    seconds: float
    sampling_seconds: float
    outputs: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"denoised {self.input_description}",
            f"  liver NSTD {self.nstd:.4f} ({self.nstd_source})",
            f"  {self.sampler}; checkpoint {self.checkpoint}; {self.device}, {self.precision}, "
            f"{self.engine}",
            f"  {self.seconds:.1f} s ({self.sampling_seconds:.1f} s sampling)",
            *(f"  wrote {p}" for p in self.outputs),
        ]
        return "\n".join(lines)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti_sibling(path: Path, suffix: str) -> Path:
    """``out.nii.gz`` -> ``out<suffix>.nii.gz`` (same extension)."""
    name = path.name
    ext = next(e for e in NIFTI_SUFFIXES if name.lower().endswith(e))
    return path.with_name(name[: -len(ext)] + suffix + name[-len(ext):])


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_writable(target: Path) -> None:
    """The nearest existing ancestor of ``target`` must be a folder we may write in."""
    ancestor = target.parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # dangling link
            raise FedNdifError(f"{ancestor}: a broken symbolic link on the output path")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FedNdifError(f"{target}: cannot write there, {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FedNdifError(f"{target}: cannot write there, {ancestor} is not writable")


@dataclass
class _Plan:
    """Validated paths of one run."""

    kind: str  # "dicom" | "nifti" (input)
    fmt: str
    output: Path
    targets: dict[str, Path]  # what -> final path (nifti format) or name inside OUTPUT folder


def _plan(input_path: Path, output: Path, *, fmt: str | None, uncertainty: bool,
          overwrite: bool) -> _Plan:
    if input_path.is_dir():
        kind = "dicom"
    elif input_path.is_file() and _is_nifti(input_path):
        kind = "nifti"
    elif input_path.exists():
        raise FedNdifError(f"{input_path}: INPUT must be a DICOM folder or a .nii/.nii.gz volume")
    else:
        raise FedNdifError(f"{input_path}: no such file or folder")
    fmt = fmt or kind
    if fmt not in FORMATS:
        raise FedNdifError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if kind == "nifti" and fmt != "nifti":
        raise FedNdifError(f"--format {fmt}: a DICOM series joins the input's study, and a NIfTI "
                           "input has none; use --format nifti (or a DICOM input)")
    real_in = input_path.resolve()
    if fmt == "nifti":
        if not _is_nifti(output):
            raise FedNdifError(f"{output}: with --format nifti, OUTPUT must be a .nii.gz (or "
                               ".nii) file")
        targets = {"denoised": output}
        if uncertainty:
            targets["uncertainty"] = _nifti_sibling(output, "_uncertainty")
    else:
        if _is_nifti(output):
            raise FedNdifError(f"{output}: with --format {fmt}, OUTPUT is a folder; name it "
                               "without .nii/.nii.gz")
        targets = {"output": output}
    for path in targets.values():
        real = path.resolve()
        if kind == "dicom" and _inside(real, real_in):
            raise FedNdifError(f"{path}: the output lies inside the input folder {input_path}; "
                               "choose a folder outside it")
        if real == real_in or _inside(real_in, real):
            raise FedNdifError(f"{path}: the output would replace the input {input_path}")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise FedNdifError(f"{path} exists; pass --overwrite to replace it")
        if fmt == "nifti" and path.is_dir():
            raise FedNdifError(f"{path} is a folder; a NIfTI output must be a file path")
        _check_writable(path)
    return _Plan(kind=kind, fmt=fmt, output=output, targets=targets)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A checked, loaded checkpoint with its sampler: load once, denoise many studies (the DICOM
    node does; the command loads per run)."""

    state: TrainingState
    sampler: SamplerConfig | None  # None for a (deterministic) U-Net
    label: str  # checkpoint as named in outputs
    sha: str
    provenance: str  # "step N" of a site checkpoint, "round N" of a global one
    device: Any  # torch.device
    precision: str
    batch_size: int | None
    uncertainty: bool
    network: Any  # the EMA network as the engine runs it (nn.Module)
    engine: str  # e.g. "onnxruntime, 2 threads"


def _warm_start_overrides(warm_start: str | None, total: int) -> dict[str, Any]:
    if warm_start is None:
        return {}
    if warm_start == "none":
        return {"warm_start": "none", "t_start": None}
    try:
        step = int(warm_start)
    except ValueError:
        step = -1
    if not 0 <= step < total:
        raise FedNdifError(f"--warm-start {warm_start}: give 'none' (from pure noise) or a "
                           f"diffusion step from 0 to {total - 1}")
    return {"warm_start": "low_count", "t_start": step}


def load_model(checkpoint: str | Path, *, steps: int | None = None, samples: int | None = None,
               uncertainty: bool = False, device: str = "auto", precision: str = "fp32",
               sampler_name: str | None = None, batch_size: int | None = None,
               engine: str = "auto", threads: int | None = None,
               warm_start: str | None = None) -> LoadedModel:
    """Read and check the checkpoint (no code executed: ``weights_only=True``), then load it.

    ``warm_start``: ``"none"`` samples from pure noise, a step number starts from the low-count
    input noised to that step; default: the checkpoint's sampler setting.

    ``threads`` (default: every core this process may use) sets PyTorch's and the engine's
    thread count for the process; ``engine``: see :mod:`fed_ndif.models.engines`.
    """
    checkpoint = Path(checkpoint)
    _check_run_options(device=device, precision=precision, batch_size=batch_size,
                       threads=threads)
    ckpt = read_checkpoint(checkpoint)  # missing, corrupt or foreign files: one clear error
    cfg = check_for_inference(checkpoint, ckpt)
    for name, value in (("--steps", steps), ("--samples", samples)):
        if value is not None and value < 1:
            raise FedNdifError(f"{name} must be at least 1, got {value}")
    sampler = None
    if cfg["model"]["kind"] == "diffusion":
        overrides = {key: value for key, value in (("steps", steps), ("samples", samples),
                                                   ("name", sampler_name))
                     if value is not None}
        try:
            total = int(cfg["diffusion"]["num_train_timesteps"])
            overrides.update(_warm_start_overrides(warm_start, total))
            sampler = sampler_config(cfg, **overrides)
        except (KeyError, TypeError) as exc:
            raise FedNdifError(f"{checkpoint}: the checkpoint's diffusion/sampler settings are "
                               f"incomplete ({exc.__class__.__name__}: {exc})") from None
        t_start = total - 1 if sampler.warm_start == "none" else int(sampler.t_start or 0)
        if sampler.name != "ddpm" and sampler.steps > t_start + 1:
            raise FedNdifError(f"--steps {sampler.steps} is more than the {t_start + 1} "
                               "diffusion steps this checkpoint samples from")
        if uncertainty and sampler.samples < 2:
            raise FedNdifError("--uncertainty is the per-voxel std over samples: pass --samples "
                               "2 or more")
    else:
        if uncertainty:
            raise FedNdifError(f"{checkpoint}: a U-Net checkpoint is deterministic and has no "
                               "uncertainty map; drop --uncertainty")
        if steps is not None or samples is not None:
            log.warning("a U-Net checkpoint is deterministic: --steps/--samples are ignored")
    dev = resolve_device(device)
    engine = choose_engine(engine, device=dev, precision=precision)
    state = load_checkpoint(checkpoint, device=str(dev))  # weights must fit (channels, k)
    label = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.parent.name else (
        checkpoint.name)
    provenance = (f"round {int(ckpt['round'])}" if "round" in ckpt
                  else f"step {int(ckpt.get('step', 0))}")
    if precision == "bf16" and dev.type == "cpu":
        # Most CPUs have no fast bf16 matrix units: PyTorch emulates it, far slower than fp32.
        log.warning("--precision bf16 on a CPU is usually much slower than fp32; it is meant "
                    "for GPUs")
    threads = threads or available_threads()
    network = inference_network(state.ema.model, engine=engine, threads=threads)
    engine = "torch" if network is state.ema.model else engine
    return LoadedModel(state=state, sampler=sampler, label=label, sha=_sha256(checkpoint)[:12],
                       provenance=provenance, device=dev, precision=precision,
                       batch_size=batch_size, uncertainty=uncertainty, network=network,
                       engine=f"{engine}, {threads} thread{'s' if threads > 1 else ''}"
                       if dev.type == "cpu" else engine)


def _check_run_options(*, device: str, precision: str, batch_size: int | None,
                       threads: int | None = None) -> None:
    if precision not in PRECISIONS:
        raise FedNdifError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                           f"{precision!r}")
    if device not in DEVICES:
        raise FedNdifError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if batch_size is not None and batch_size < 1:
        raise FedNdifError(f"--batch-size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise FedNdifError(f"--threads must be at least 1, got {threads}")


def derived_uid_sources(info: PetSeriesInfo, pixels: np.ndarray) -> list[str]:
    """What a derived series' UIDs are derived from: its source series (its UID and its
    instances) and its own pixels. The same pixels from the same source always get the same
    UIDs, so a PACS sent the series twice holds one; other pixels (another seed, checkpoint,
    sampler, or a CPU whose kernels round differently) never come under UIDs already used."""
    instances = hashlib.sha256("\\".join(sorted(info.sop_instance_uids)).encode()).hexdigest()
    content = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return ["fed-ndif derived", info.series_uid, instances, f"pixels {content.hexdigest()}"]


def _check_axial(volume: Volume, where: Path) -> None:
    axis = volume.affine[:3, 2]
    norm = float(np.linalg.norm(axis))
    if norm == 0 or abs(axis[2]) / norm < 0.99:
        raise FedNdifError(f"{where}: the volume's third axis is not along the body axis; "
                           "the 2.5D model needs axial slices (reorient it first)")


def _load_mask(path: Path, volume: Volume) -> np.ndarray:
    mask = load_nifti(path)
    if mask.array.shape != volume.array.shape:
        raise FedNdifError(f"{path}: liver mask shape {mask.array.shape} (z, y, x) differs from "
                           f"the input's {volume.array.shape}")
    if not np.allclose(mask.affine, volume.affine, atol=MASK_AFFINE_TOLERANCE_MM):
        raise FedNdifError(f"{path}: the liver mask is on another voxel grid (affine) than the "
                           "input; resample it to the input first")
    return mask.array > 0


def denoise_study(
    input_path: str | Path, output: str | Path, *, checkpoint: str | Path | None = None,
    steps: int | None = None, samples: int | None = None, sampler_name: str | None = None,
    warm_start: str | None = None, uncertainty: bool = False, output_format: str | None = None,
    liver_mask: str | Path | None = None, nstd: float | None = None,
    device: str = "auto", precision: str = "fp32", overwrite: bool = False,
    weight_kg: float | None = None, dose_bq: float | None = None, series_uid: str | None = None,
    seed: int = 0, batch_size: int | None = None, progress: bool = True,
    engine: str = "auto", threads: int | None = None, model: LoadedModel | None = None,
) -> DenoiseResult:
    """Denoise the PET study at ``input_path`` into ``output``; see ``docs/denoise.md``.

    ``steps`` / ``samples`` / ``sampler_name`` / ``warm_start`` default to the checkpoint's
    sampler settings;
    ``output_format`` defaults to the input's kind (``dicom`` for a DICOM folder, ``nifti`` for
    a NIfTI file). ``weight_kg`` / ``dose_bq`` / ``series_uid`` apply to DICOM input, as in
    :func:`~fed_ndif.data.dicom.read_pet_series`. ``model`` (from :func:`load_model`) replaces
    ``checkpoint`` and the options it was loaded with (steps, samples, sampler, uncertainty,
    device, precision, batch size, engine, threads), so a long-running service loads the
    checkpoint once.
    """
    started = time.perf_counter()
    input_path, output = Path(input_path), Path(output)
    if model is None:
        if checkpoint is None:
            raise ValueError("give a checkpoint or a loaded model")
        _check_run_options(device=device, precision=precision, batch_size=batch_size,
                           threads=threads)
    else:
        uncertainty, precision, batch_size = model.uncertainty, model.precision, model.batch_size
    check_weight_and_dose(weight_kg, dose_bq)
    plan = _plan(input_path, output, fmt=output_format, uncertainty=uncertainty,
                 overwrite=overwrite)
    if plan.kind == "nifti" and (weight_kg is not None or dose_bq is not None
                                 or series_uid is not None):
        raise FedNdifError("--weight, --dose and --series-uid apply to DICOM input; a NIfTI "
                           "input is already in SUV")
    mask_path = Path(liver_mask) if liver_mask is not None else None
    if mask_path is not None and not mask_path.is_file():
        raise FedNdifError(f"{mask_path}: no such liver mask file")
    if nstd is not None and (mask_path is not None or not (math.isfinite(nstd) and nstd > 0)):
        raise FedNdifError(f"--nstd {nstd}: give a positive noise level, and either --nstd or "
                           "--liver-mask, not both")
    if model is None:
        assert checkpoint is not None
        model = load_model(checkpoint, steps=steps, samples=samples, sampler_name=sampler_name,
                           warm_start=warm_start, uncertainty=uncertainty, device=device,
                           precision=precision, batch_size=batch_size, engine=engine,
                           threads=threads)
    state, dev = model.state, model.device

    # Outputs are written beside their final names and renamed into place only when complete.
    with contextlib.ExitStack() as stack:
        try:
            if plan.fmt == "nifti":
                files = {what: stack.enter_context(staged_file(path))
                         for what, path in plan.targets.items()}
            else:
                folder = stack.enter_context(staged_folder(plan.output))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk is not the output's fault: the node tries again later
            first = next(iter(plan.targets.values()))
            raise FedNdifError(f"{first}: cannot write there ({exc.strerror or exc})") from None
        info = None
        if plan.kind == "dicom":
            volume, info = read_pet_series(input_path, series_uid=series_uid,
                                           patient_weight_kg=weight_kg, injected_dose_bq=dose_bq)
            number = str(info.template.get("SeriesNumber", "") or "?")
            derived = derived_reason(info.template)
            if derived is not None:
                raise FedNdifError(f"{input_path}: PET series {number} is {derived}; fed-ndif "
                                   "denoises acquisitions only")
            # By number only: a free-text description can name the patient.
            what = f"PET series {number}"
        else:
            volume = load_nifti(input_path)
            what = f"NIfTI volume {input_path.name}"
        _check_axial(volume, input_path)
        nz, ny, nx = volume.array.shape
        dz, dy, dx = volume.spacing
        what += f" ({nz} slices of {ny}x{nx}, {dz:.2f} x {dy:.2f} x {dx:.2f} mm)"
        if nstd is not None:  # the user's word: no liver is looked for, nothing is checked
            how = "given with --nstd"
        else:
            # An automatic VOI is checked for plausibility (side, height, volume, SUV, NSTD)
            # and refused in one line; a mask or --nstd is the user's override.
            mask = _load_mask(mask_path, volume) if mask_path is not None else None
            nstd, how = measure_liver_nstd(volume, mask)
        if not math.isfinite(nstd) or nstd <= 0:
            raise FedNdifError(f"liver NSTD is {nstd} ({how}); pass a liver mask on the liver")

        sampler = model.sampler
        if sampler is not None:
            warm = "" if sampler.warm_start == "none" else f", warm start {sampler.warm_start}"
            label = (f"{SAMPLER_LABELS.get(sampler.name, sampler.name)}{warm}"
                     f", {sampler.steps} step"
                     f"{'s' if sampler.steps > 1 else ''} x {sampler.samples} sample"
                     f"{'s' if sampler.samples > 1 else ''}")
            short = f"{sampler.steps}x{sampler.samples}"
        else:
            label, short = "U-Net (deterministic)", "unet"
        log.info("denoising %s: liver NSTD %.4f (%s), %s", what, nstd, how, label)
        sampling_start = time.perf_counter()
        mean, std = denoise_volume(
            model.network, volume.array, nstd=nstd, normalization=state.normalization,
            k=state.k, process=state.process, sampler=sampler, batch_size=batch_size,
            device=str(dev), window=state.window, dtype=PRECISIONS[precision], seed=seed,
            progress=progress)
        sampling_seconds = time.perf_counter() - sampling_start
        denoised = Volume(mean, volume.affine)
        spread = Volume(std, volume.affine) if uncertainty and std is not None else None

        derivation = (f"Denoised by fed-ndif {fed_ndif.__version__} ({label}, seed {seed}) with "
                      f"checkpoint {model.label} ({model.provenance}, sha256 {model.sha}); "
                      f"liver NSTD {nstd:.4f} ({how})")
        if plan.fmt == "nifti":
            save_nifti(denoised, files["denoised"])
            if spread is not None:
                save_nifti(spread, files["uncertainty"])
            outputs = [plan.targets["denoised"]]
            if spread is not None:
                outputs.append(plan.targets["uncertainty"])
        else:
            assert info is not None
            source_number = _series_number(info.template.get("SeriesNumber"))
            write_pet_series(denoised, folder / DENOISED_SERIES, template=info,
                             series_description=f"fed-ndif denoised {short} {model.label}",
                             derivation_description=derivation,
                             series_number=source_number + 1000,
                             uid_entropy=[*derived_uid_sources(info, denoised.array),
                                          DENOISED_SERIES])
            if spread is not None:
                write_pet_series(
                    spread, folder / UNCERTAINTY_SERIES, template=info,
                    series_description=f"fed-ndif uncertainty SD {short} {model.label}",
                    derivation_description="Per-voxel standard deviation over samples. "
                                           + derivation,
                    series_number=source_number + 1001,
                    uid_entropy=[*derived_uid_sources(info, spread.array),
                                 UNCERTAINTY_SERIES])
            if plan.fmt == "both":
                save_nifti(denoised, folder / DENOISED_NIFTI)
                if spread is not None:
                    save_nifti(spread, folder / UNCERTAINTY_NIFTI)
            outputs = [plan.output / name for name in sorted(p.name for p in folder.iterdir())]
    return DenoiseResult(
        input_description=what, nstd=nstd, nstd_source=how, sampler=label,
        checkpoint=f"{model.label} ({model.provenance})", device=str(dev), precision=precision,
        engine=model.engine,
        seconds=time.perf_counter() - started, sampling_seconds=sampling_seconds,
        outputs=outputs)


def _series_number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


__all__ = ["DenoiseResult", "LoadedModel", "denoise_study", "load_model"]
