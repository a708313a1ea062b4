"""Simulated hospital sites: subjects, scans at several count levels, masks and a manifest.

Each site folder gets a manifest in the format of :mod:`fed_ndif.data.manifest`, the same one
a hospital fills in for its own data.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from pydicom.uid import generate_uid
from tqdm import tqdm

from fed_ndif.config import load_config
from fed_ndif.data.dicom import SyntheticPatient, write_pet_series
from fed_ndif.data.manifest import MANIFEST_NAME, write_manifest
from fed_ndif.data.nifti import save_nifti
from fed_ndif.data.phantom import MIN_FOV_MM, Grid, Organ, make_phantom
from fed_ndif.data.scanner import NOISE_FREE, ScannerProfile, simulate_scans
from fed_ndif.data.volume import Volume, axial_affine
from fed_ndif.errors import FedNdifError
from fed_ndif.staging import staged_folder

log = logging.getLogger(__name__)

MIN_MATRIX = 16
# The part of a composed config that defines the simulated sites (make_sites.yaml's keys).
SITE_CONFIG_KEYS = ("sites", "seed", "split", "write_dicom")
MIN_SLICES = 8
# Fixed scan start of every simulated DICOM study (injection 60 min before), so files repeat.
DICOM_SCAN_START = datetime(2024, 1, 15, 10, 0, 0)


@dataclass(frozen=True)
class SiteSpec:
    name: str
    scanner: ScannerProfile
    subjects: int
    count_levels: tuple[float, ...]


def count_level_tag(level: float) -> str:
    """File-name tag of a count level: 0.05 -> '5pct', 0.005 -> '0.5pct'."""
    return f"{level * 100:g}pct"


def parse_sites(cfg: DictConfig) -> list[SiteSpec]:
    """Validate the ``sites`` config before anything is simulated or written."""
    if not cfg.get("sites"):
        raise FedNdifError("configuration error: no sites are configured")
    known = {f.name for f in fields(ScannerProfile)}
    specs = []
    for name, site in cfg.sites.items():
        where = f"sites.{name}"
        scanner_cfg = OmegaConf.to_container(site.get("scanner") or {}, resolve=True)
        unknown = set(scanner_cfg) - known
        missing = known - set(scanner_cfg)
        if unknown or missing:
            raise FedNdifError(f"configuration error: {where}.scanner has unknown keys "
                               f"{sorted(unknown)} or lacks {sorted(missing)}")
        for key, value in scanner_cfg.items():
            if key != "name" and (not isinstance(value, int | float) or value < 0 or (
                    value == 0 and key not in {"postfilter_fwhm_mm", "background_fraction"})):
                raise FedNdifError(f"configuration error: {where}.scanner.{key} must be a "
                                   f"positive number, got {value!r}")
        scanner = ScannerProfile(**scanner_cfg)
        if scanner.matrix < MIN_MATRIX or scanner.slices < MIN_SLICES:
            raise FedNdifError(f"configuration error: {where}.scanner matrix {scanner.matrix} x "
                               f"{scanner.slices} slices is too small (at least {MIN_MATRIX} and "
                               f"{MIN_SLICES})")
        fov = scanner.matrix * scanner.pixel_mm
        if fov < MIN_FOV_MM:
            raise FedNdifError(f"configuration error: {where}.scanner field of view "
                               f"{scanner.matrix} x {scanner.pixel_mm} mm = {fov:g} mm is too "
                               f"small for the anatomy (needs at least {MIN_FOV_MM:g} mm)")
        levels = tuple(float(c) for c in site.get("count_levels") or ())
        if not levels or any(not 0.0 < c < 1.0 for c in levels):
            raise FedNdifError(f"configuration error: {where}.count_levels must be fractions "
                               f"in (0, 1), got {list(levels)}")
        subjects = site.get("subjects")
        if not isinstance(subjects, int) or subjects < 1:
            raise FedNdifError(f"configuration error: {where}.subjects must be a positive "
                               f"integer, got {subjects!r}")
        specs.append(SiteSpec(name=str(name), scanner=scanner, subjects=subjects,
                              count_levels=tuple(sorted(set(levels), reverse=True))))
    return specs


def assign_splits(n_subjects: int, *, val_fraction: float, test_fraction: float) -> list[str]:
    """Split by subject: test and val get at least one subject each when there are three or more."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise FedNdifError("configuration error: split fractions must be in [0, 1) and sum below 1")
    n_test = max(1, round(test_fraction * n_subjects)) if n_subjects >= 2 and test_fraction else 0
    n_val = max(1, round(val_fraction * n_subjects)) if n_subjects >= 3 and val_fraction else 0
    n_train = n_subjects - n_val - n_test
    return ["train"] * n_train + ["val"] * n_val + ["test"] * n_test


def _subject_rng(seed: int, site: str, index: int) -> np.random.Generator:
    # crc32, not hash(): the same seed must give the same files in every Python process.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(site.encode()), index]))


def simulate_subject(site: SiteSpec, index: int, seed: int) -> dict[str, np.ndarray | list]:
    """Phantom and scans of one subject (deterministic for seed, site and index)."""
    rng = _subject_rng(seed, site.name, index)
    phantom = make_phantom(Grid(site.scanner.shape, site.scanner.spacing), rng)
    scans = simulate_scans(phantom.activity, phantom.mu, site.scanner, list(site.count_levels), rng,
                           noise_free=True)
    return {"phantom": phantom, "scans": scans}


def _synthetic_patient(site: SiteSpec, index: int, seed: int) -> SyntheticPatient:
    """Patient/study metadata of a simulated subject, deterministic for seed, site and index.

    Drawn from its own generator, so the simulated images do not depend on whether DICOM is
    written. UIDs are derived (not random) so the same seed gives identical files.
    """
    rng = np.random.default_rng(np.random.SeedSequence(
        [seed, zlib.crc32(site.name.encode()), index, 1]))
    weight = round(float(rng.uniform(55.0, 95.0)), 1)
    dose = round(weight * float(rng.uniform(3.0, 4.0)), 1) * 1e6  # ~3.5 MBq/kg of 18F-FDG
    entropy = ["fed-ndif", str(seed), site.name, str(index)]
    return SyntheticPatient(
        patient_id=f"{site.name}-sub-{index + 1:03d}", weight_kg=weight, injected_dose_bq=dose,
        study_uid=generate_uid(entropy_srcs=[*entropy, "study"]),
        frame_uid=generate_uid(entropy_srcs=[*entropy, "frame"]),
        scan_start=DICOM_SCAN_START, injection_time=DICOM_SCAN_START - timedelta(minutes=60))


def _write_dicom_series(site: SiteSpec, index: int, seed: int, subject_dir: Path,
                        scans: dict[float, np.ndarray], affine: np.ndarray) -> None:
    """``<subject>/dicom/<full_count|low_count_Npct>/``: one study, one series per scan."""
    patient = _synthetic_patient(site, index, seed)
    content = DICOM_SCAN_START + timedelta(minutes=30)
    levels = [1.0, *site.count_levels]
    for number, level in enumerate(levels, start=1):
        if level == 1.0:
            name, description = "full_count", "PET WB full count (simulated)"
        else:
            tag = count_level_tag(level)
            name, description = f"low_count_{tag}", f"PET WB low count {tag} (simulated)"
        write_pet_series(
            Volume(scans[level], affine), subject_dir / "dicom" / name, template=None,
            series_description=description,
            derivation_description=(f"simulated by fed-ndif make-sites: scanner "
                                    f"{site.scanner.name}, {level * 100:g} % of full count, "
                                    f"seed {seed}"),
            synthetic_patient=patient, series_number=number, content_datetime=content,
            uid_entropy=["fed-ndif", str(seed), site.name, str(index), name])


def _write_subject(site: SiteSpec, index: int, split: str, seed: int,
                   site_dir: Path, *, write_dicom: bool = False) -> list[dict[str, str]]:
    subject = f"sub-{index + 1:03d}"
    result = simulate_subject(site, index, seed)
    phantom, scans = result["phantom"], result["scans"]
    affine = axial_affine(shape_zyx=site.scanner.shape, spacing_zyx=site.scanner.spacing)
    subject_dir = site_dir / subject
    subject_dir.mkdir()
    save_nifti(scans[1.0], subject_dir / "full_count.nii.gz", affine=affine)
    save_nifti(scans[NOISE_FREE], subject_dir / "noise_free.nii.gz", affine=affine)
    # The liver VOI excludes liver lesions: NSTD must measure noise, not lesion uptake.
    save_nifti((phantom.organs == Organ.LIVER) & (phantom.lesions == 0),
               subject_dir / "liver_mask.nii.gz", affine=affine, dtype=np.uint8)
    save_nifti(phantom.lesions, subject_dir / "lesion_mask.nii.gz", affine=affine, dtype=np.uint16)
    save_nifti(phantom.organs, subject_dir / "organs.nii.gz", affine=affine, dtype=np.uint8)
    save_nifti(phantom.activity, subject_dir / "activity_truth.nii.gz", affine=affine)
    lesions = [{"label": i, **asdict(info), "site": info.site.name.lower()}
               for i, info in enumerate(phantom.lesions_info, start=1)]
    (subject_dir / "lesions.json").write_text(json.dumps(lesions, indent=1))
    rows = []
    for level in site.count_levels:
        name = f"low_count_{count_level_tag(level)}.nii.gz"
        save_nifti(scans[level], subject_dir / name, affine=affine)
        rows.append({"subject": subject, "count_level": f"{level:g}",
                     "low_count": f"{subject}/{name}", "full_count": f"{subject}/full_count.nii.gz",
                     "liver_mask": f"{subject}/liver_mask.nii.gz",
                     "lesion_mask": f"{subject}/lesion_mask.nii.gz", "split": split,
                     "ideal": f"{subject}/noise_free.nii.gz"})
    if write_dicom:
        _write_dicom_series(site, index, seed, subject_dir, scans, affine)
    return rows


def make_sites(out: Path, *, overrides: list[str] | tuple[str, ...] = (), overwrite: bool = False,
               montage: Path | None = None) -> list[Path]:
    """``fed-ndif make-sites``: compose configs/make_sites.yaml with overrides, write the sites."""
    return write_sites(out, load_config("make_sites", overrides), overwrite=overwrite,
                       montage=montage)


def write_sites(out: Path, cfg: DictConfig, *, overwrite: bool = False,
                montage: Path | None = None) -> list[Path]:
    """Write every site of ``cfg`` (sites, seed, split) under ``out`` atomically; return the
    manifest paths."""
    specs = parse_sites(cfg)
    write_dicom = cfg.get("write_dicom", False)
    if not isinstance(write_dicom, bool):
        raise FedNdifError(f"configuration error: write_dicom must be true or false, got "
                           f"{write_dicom!r}")
    splits = {s.name: assign_splits(s.subjects, val_fraction=cfg.split.val_fraction,
                                    test_fraction=cfg.split.test_fraction) for s in specs}
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedNdifError(f"{out} already exists; choose a new folder or pass --overwrite")
    if montage is not None and montage.suffix.lower() != ".png":
        raise FedNdifError(f"--montage {montage}: the picture must be a .png file")
    with staged_folder(out) as staging:
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(
            {key: cfg[key] for key in SITE_CONFIG_KEYS if key in cfg}))
        jobs = [(s, i) for s in specs for i in range(s.subjects)]
        manifests = {s.name: [] for s in specs}
        for spec in specs:
            (staging / spec.name).mkdir()
            (staging / spec.name / "scanner.json").write_text(
                json.dumps(asdict(spec.scanner), indent=1))
        for spec, index in tqdm(jobs, desc="simulating subjects", unit="subject"):
            manifests[spec.name] += _write_subject(
                spec, index, splits[spec.name][index], int(cfg.seed), staging / spec.name,
                write_dicom=write_dicom)
        for name, rows in manifests.items():
            write_manifest(staging / name / MANIFEST_NAME, rows)
    if montage is not None:
        from fed_ndif.data.montage import write_site_montage

        write_site_montage(out, [s.name for s in specs], montage)
        log.info("wrote the site montage to %s", montage)
    log.info("wrote %d sites (%d subjects) to %s", len(specs), len(jobs), out)
    return [out / s.name / MANIFEST_NAME for s in specs]
