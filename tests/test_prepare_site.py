"""``fed-ndif prepare-site`` on realistic exports: pairing, SUV, no PHI, atomic and resumable,
and the prepared folder trains (train-local and the site's ClientApp)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from flwr.app import Context, RecordDict
from pydicom.fileset import FileSet
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

import fed_ndif.data.prepare.site as site_module
from fed_ndif.cli import main
from fed_ndif.client.app import app as client_app
from fed_ndif.config import load_config
from fed_ndif.data.dicom import read_pet_series, write_pet_series
from fed_ndif.data.manifest import read_manifest
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.sites import make_sites
from fed_ndif.data.volume import Volume
from fed_ndif.run_config import to_run_config
from fed_ndif.runtime.inprocess import InProcessGrid
from fed_ndif.server.app import app as server_app
from tests.helpers.exports import FULL_FRAME_MS, build_export, copy_series, plant_identity

# Four subjects, long enough (48 x 8 mm) for the automatic liver VOI.
SITES = ["sites=tiny", "~sites.site_b", "~sites.site_c", "sites.site_a.subjects=4",
         "sites.site_a.count_levels=[0.1,0.25]", "sites.site_a.scanner.slices=48",
         "sites.site_a.scanner.slice_mm=8.0", "write_dicom=true"]
TINY_TRAIN = ["model=tiny", "model.k=1", "model.diffusion_net.channels=[8,16,16]",
              "model.diffusion_net.num_head_channels=8", "model.diffusion_net.norm_num_groups=4",
              "train.batch_size=2", "diffusion.sampler.steps=2", "train.device=cpu"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sim") / "sites"
    make_sites(root, overrides=SITES)
    return root / "site_a"


@pytest.fixture(scope="module")
def salt(tmp_path_factory) -> Path:
    """The site's secret salt file, outside every site folder (made by the first run)."""
    return tmp_path_factory.mktemp("secret") / "site.salt"


def _quantization_bound(array: np.ndarray) -> np.ndarray:
    peak = np.abs(array).reshape(array.shape[0], -1).max(axis=1)
    return (peak / 32767 * 0.5 + 1e-5 * peak + 1e-6)[:, None, None]


def _key(path: Path) -> dict[str, str]:
    with path.open(newline="") as handle:
        return {f"{r['subject']}/{r['study']}": r["study_instance_uid"]
                for r in csv.DictReader(handle)}


def _all_text(folder: Path) -> bytes:
    """Every byte under ``folder``, gzip members decompressed (NIfTI headers included)."""
    chunks = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            chunks.append(gzip.decompress(data) if path.suffix == ".gz" else data)
            chunks.append(str(path.relative_to(folder)).encode())
    return b"\n".join(chunks)


def _dates_and_paths(root: Path) -> set[str]:
    """The export's dates (DA and ISO) and paths: never in a site folder or its log."""
    found = {str(root), str(root.resolve())}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        found.add(str(path))
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "PatientBirthDate"):
            text = str(ds.get(keyword, "") or "")
            if len(text) == 8 and text.isdigit():
                found |= {text, f"{text[:4]}-{text[4:6]}-{text[6:]}"}
            elif text:
                found.add(text)
    return found


def _ambiguous_extra(subject: Path, index: int, export) -> None:
    """In the last subject's study: a dose-reduced 25 % series with the full count's frame
    duration (the headers cannot tell it from the full count) and a non-AC copy."""
    if index != 3:
        return

    def same_duration(ds):
        ds.ActualFrameDuration = FULL_FRAME_MS

    def not_corrected(ds):
        ds.ActualFrameDuration = FULL_FRAME_MS
        ds.CorrectedImage = ["NORM", "DTIM", "DECY"]

    export.series[(subject.name, "reduced_dose")] = copy_series(
        subject, "low_count_25pct", export.root, index, export, edit=same_duration, number=7)
    copy_series(subject, "full_count", export.root, index, export, edit=not_corrected, number=8)


def test_prepares_a_realistic_export_without_phi(simulated, tmp_path, capsys, caplog):
    export = build_export(simulated, tmp_path / "export", extra=_ambiguous_extra)
    # A PET file cut short in its header, in a folder named after the patient.
    pet = next(p for p in sorted(export.root.rglob("*")) if p.is_file()
               and pydicom.dcmread(p, stop_before_pixels=True).Modality == "PT")
    (export.root / "Kowalczyk^Genowefa0").mkdir()
    (export.root / "Kowalczyk^Genowefa0" / "IM0").write_bytes(pet.read_bytes()[:400])
    site, key = tmp_path / "site", tmp_path / "key.csv"
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["prepare-site", str(export.root), str(site), "--keep-key", str(key)]) == 0
    out, err = capsys.readouterr()
    log_text = (caplog.text + out + err + "".join(str(w.message) for w in caught)).encode()

    # Pairing: the ambiguous study is skipped whole, the others paired by frame duration.
    studies = read_manifest(site / "manifest.csv")
    names = _key(key)
    by_uid = {uid: name for name, uid in names.items()}
    paired = {by_uid[export.study_of[s]] for s in ("sub-001", "sub-002", "sub-003")}
    ambiguous = by_uid[export.study_of["sub-004"]]
    assert {f"{s.subject}/{s.full_count.parent.name}" for s in studies} == paired
    assert sorted(s.count_level for s in studies) == [0.1] * 3 + [0.25] * 3
    assert all(s.liver_mask is None and s.lesion_mask is None for s in studies)
    summary = json.loads((site / "prepare.json").read_text())
    assert summary["pairs_per_count_level"] == {"0.1": 3, "0.25": 3}
    reasons = {(n["study"], n["reason"].split(",")[0].split(";")[0]) for n in summary["skipped"]}
    assert (ambiguous, "2 series share the longest frame durations") in reasons
    assert (ambiguous, "not attenuation-corrected (CorrectedImage lacks ATTN)") in reasons
    assert len(summary["skipped"]) == 5  # the non-AC copy; full, 10 %, 25 %, dose-reduced
    assert summary["subjects_per_split"] == {"train": 1, "val": 1, "test": 1}
    assert summary["automatic_liver_voi_failed"] == []  # every full count shows its liver
    assert len(summary["unreadable_files"]) == 1
    assert summary["unreadable_files"][0].startswith("a PET DICOM file that is truncated")
    assert "pairs per count level: 10 %: 3, 25 %: 3" in caplog.text

    # SUV equals the simulated NIfTI (to the int16 quantization of the DICOM), same grid.
    for study in studies:
        source = next(s for s, uid in export.study_of.items()
                      if by_uid[uid] == f"{study.subject}/{study.full_count.parent.name}")
        for prepared, original in ((study.full_count, "full_count"),
                                   (study.low_count, f"low_count_{study.count_level * 100:g}pct")):
            got, want = load_nifti(prepared), load_nifti(simulated / source / f"{original}.nii.gz")
            np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
            assert np.all(np.abs(got.array - want.array) <= _quantization_bound(want.array))

    # No identity anywhere: not in any file (NIfTI headers included) nor in the log.
    everything = _all_text(site)
    leaked = sorted(p for p in export.phi if p.encode() in everything or p.encode() in log_text)
    assert leaked == []
    # Nor any date of the studies (as stored, or in ISO form), nor a path of the export.
    assert _dates_and_paths(export.root) and not [
        t for t in _dates_and_paths(export.root) if t.encode() in everything + log_text]
    for path in site.rglob("*.nii.gz"):
        header = nib.load(path).header
        assert all(header[f].item() in (b"", "") for f in ("descrip", "aux_file", "intent_name"))
    # The key, outside the site, leads back to the studies.
    assert set(names.values()) == set(export.study_of.values())


def test_a_pairs_file_resolves_what_headers_cannot(simulated, salt, tmp_path):
    export = build_export(simulated, tmp_path / "export", extra=_ambiguous_extra)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("low_count_series_uid,full_count_series_uid,count_level\n"
                     f"{export.series[('sub-004', 'reduced_dose')]},"
                     f"{export.series[('sub-004', 'full_count')]},0.25\n")
    site = tmp_path / "site"
    assert main(["prepare-site", str(export.root), str(site), "--pairs", str(pairs),
                 "--salt", str(salt)]) == 0
    rows = [s for s in read_manifest(site / "manifest.csv")]
    assert len(rows) == 9  # the last study now: 10 % and 25 % by duration, 25 % from the file
    names = sorted(s.low_count.name for s in rows if s.count_level == 0.25)
    assert names.count("low_count_25pct_2.nii.gz") == 1
    summary = json.loads((site / "prepare.json").read_text())
    assert [n["reason"] for n in summary["skipped"]] == [
        "not attenuation-corrected (CorrectedImage lacks ATTN)"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_run_resumes_and_reruns_give_the_same_folder(simulated, salt, tmp_path,
                                                                 monkeypatch):
    export = build_export(simulated, tmp_path / "export")
    clean = tmp_path / "clean"
    site_module.prepare_site(export.root, clean, progress=False, salt=salt)
    reference = _digest(clean)
    assert site_module.prepare_site(export.root, clean, overwrite=True, progress=False,
                                    salt=salt)
    assert _digest(clean) == reference

    site = tmp_path / "site"
    real, calls = site_module._write_study, []

    def interrupted(plan, folder, roots):
        calls.append(plan.name.folder)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(plan, folder, roots)

    monkeypatch.setattr(site_module, "_write_study", interrupted)
    with pytest.raises(KeyboardInterrupt):
        site_module.prepare_site(export.root, site, progress=False, salt=salt)
    assert not site.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.partial", "clean", "export"]
    calls.clear()
    monkeypatch.setattr(site_module, "_write_study", lambda *a: (calls.append(a[0]), real(*a))[1])
    site_module.prepare_site(export.root, site, progress=False, salt=salt)
    assert len(calls) == 2  # the two studies written before the interruption were kept
    assert _digest(site) == reference
    assert not (tmp_path / ".site.partial").exists()


@pytest.mark.parametrize("case,message", [
    ("no-export", "no such folder"),
    ("key-inside", "must be kept outside the site folder"),
    ("site-exists", "exists; choose a new folder or pass --overwrite"),
    ("too-few", "leave no training subject"),
    ("bad-pairs", "count_level must be a fraction"),
    ("unknown-pairs", r"pairs.csv:2: the low-count series is not a PET series of the export"),
    ("no-pet", "no PET series"),
    ("no-salt", "needs the site's secret salt: pass --keep-key FILE"),
    ("salt-inside", "the salt must be kept outside the site folder"),
    ("not-a-salt", "not a fed-ndif salt file"),
])
def test_bad_input_one_line_and_nothing_written(simulated, salt, tmp_path, capsys, case, message):
    export = build_export(simulated, tmp_path / "export")
    site = tmp_path / "out" / "site"
    args = ["prepare-site", str(export.root), str(site), "--salt", str(salt)]
    pairs = tmp_path / "pairs.csv"
    if case == "no-export":
        args[1] = str(tmp_path / "missing")
    elif case == "key-inside":
        args += ["--keep-key", str(site / "key.csv")]
    elif case == "site-exists":
        site.mkdir(parents=True)
        (site / "mine.txt").write_text("keep")
    elif case == "too-few":
        args += ["--val", "2", "--test", "2"]
    elif case in ("bad-pairs", "unknown-pairs"):
        level = "10" if case == "bad-pairs" else "0.1"
        pairs.write_text(f"low_count_series_uid,full_count_series_uid,count_level\n1.2.3,"
                         f"1.2.4,{level}\n")
        args += ["--pairs", str(pairs)]
    elif case == "no-salt":
        args.remove("--salt")
        args.remove(str(salt))
    elif case == "salt-inside":
        args[args.index(str(salt))] = str(site / "site.salt")
    elif case == "not-a-salt":
        args[args.index(str(salt))] = str(export.root.parent / "key.csv")
        (export.root.parent / "key.csv").write_text("subject,study\n")
    elif case == "no-pet":
        for path in export.root.rglob("*"):
            if path.is_file() and pydicom.dcmread(path, stop_before_pixels=True).Modality == "PT":
                path.unlink()
    before = sorted(p.name for p in tmp_path.rglob("*") if "export" not in p.parts)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fed-ndif prepare-site: error:")
    assert message in err[0] or __import__("re").search(message, err[0]), err[0]
    after = sorted(p.name for p in tmp_path.rglob("*") if "export" not in p.parts)
    assert after == before


@pytest.fixture(scope="module")
def prepared(simulated, salt, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    export = build_export(simulated, root / "export")
    assert main(["prepare-site", str(export.root), str(root / "site"), "--salt", str(salt)]) == 0
    return root / "site"


def test_train_local_runs_on_a_prepared_folder(prepared, tmp_path):
    out = tmp_path / "run"
    assert main(["train-local", str(prepared / "manifest.csv"), str(out), *TINY_TRAIN,
                 "train.steps=4", "train.log_every=2", "train.val_every=4"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and np.isfinite(records[-1]["val_psnr"]), records


def test_the_site_client_trains_on_a_prepared_folder(prepared, tmp_path):
    run_config = to_run_config(load_config("federated", [
        *[o for o in TINY_TRAIN if not o.startswith("train.device")], "fl.rounds=1",
        "fl.local_steps=2", "fl.min_sites=1", "fl.evaluate_max_studies=1",
        f"run_dir={tmp_path / 'run'}", "logger.wandb_mode=disabled"]))
    grid = InProcessGrid(client_app, {11: {"data-path": str(prepared)}}, run_config=run_config)
    server_app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                             run_config=run_config))
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .splitlines()]
    assert rounds and rounds[-1]["round"] == 1
    assert (tmp_path / "run" / "checkpoints" / "global-round-0001.pt").is_file()


def test_evaluation_runs_without_masks(prepared, tmp_path):
    """Blank liver mask: the automatic VOI; blank lesion mask: no lesion metrics."""
    out = tmp_path / "eval"
    assert main(["evaluate", str(prepared / "manifest.csv"), str(out), "--no-filters"]) == 0
    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {r["method"] for r in rows} == {"input"}
    assert all(0 < float(r["liver_nstd"]) < 1 and 0 < float(r["full_count_liver_nstd"])
               < float(r["liver_nstd"]) for r in rows)
    assert all(r["lesions_ge10"] in ("", "nan") for r in rows)
    assert (out / "report.md").is_file()


def test_studies_without_an_automatic_liver_voi_are_named(simulated, salt, tmp_path, monkeypatch,
                                                          caplog):
    export = build_export(simulated, tmp_path / "export")

    def no_liver(volume):
        raise site_module.FedNdifError("automatic liver VOI: no body found")

    monkeypatch.setattr(site_module, "find_liver_voi", no_liver)
    with caplog.at_level(logging.INFO):
        site_module.prepare_site(export.root, tmp_path / "site", progress=False, salt=salt)
    summary = json.loads((tmp_path / "site" / "prepare.json").read_text())
    assert [f["reason"] for f in summary["automatic_liver_voi_failed"]] == [
        "automatic liver VOI: no body found"] * 4
    assert "studies without an automatic liver VOI (give their rows a liver_mask" in caplog.text


def test_a_dicomdir_export_with_mixed_transfer_syntaxes(simulated, salt, tmp_path):
    """One subject through a DICOMDIR tree: the 10 % series RLE, the 25 % series JPEG-LS,
    the full count implicit VR without preamble; SUV still equals the simulated volumes."""
    flat = tmp_path / "flat"
    export = build_export(simulated, flat)
    study = export.study_of["sub-001"]
    syntaxes = {export.series[("sub-001", "low_count_10pct")]: RLELossless,
                export.series[("sub-001", "low_count_25pct")]: JPEGLSLossless}
    fileset = FileSet()
    for path in sorted(p for p in flat.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        if ds.StudyInstanceUID != study:
            continue
        if ds.SeriesInstanceUID in syntaxes:
            ds.compress(syntaxes[ds.SeriesInstanceUID])
        fileset.add(ds)
    fileset.write(tmp_path / "export")
    full_uid = export.series[("sub-001", "full_count")]
    for path in (tmp_path / "export").rglob("IM*"):
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == full_uid:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(path, implicit_vr=True, enforce_file_format=True)
            path.write_bytes(path.read_bytes()[132:])
    assert (tmp_path / "export" / "DICOMDIR").is_file()
    site = tmp_path / "site"
    assert main(["prepare-site", str(tmp_path / "export"), str(site), "--salt", str(salt),
                 "--val", "0",
                 "--test", "0"]) == 0
    studies = read_manifest(site / "manifest.csv")
    assert sorted(s.count_level for s in studies) == [0.1, 0.25]
    for study_row in studies:
        for prepared, original in ((study_row.full_count, "full_count"), (
                study_row.low_count, f"low_count_{study_row.count_level * 100:g}pct")):
            got = load_nifti(prepared)
            want = load_nifti(simulated / "sub-001" / f"{original}.nii.gz")
            np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
            assert np.all(np.abs(got.array - want.array) <= _quantization_bound(want.array))


def test_a_series_that_cannot_become_suv_is_skipped_with_its_reason(simulated, tmp_path,
                                                                    caplog):
    export = build_export(simulated, tmp_path / "export")
    full_uid = export.series[("sub-002", "full_count")]
    for path in export.root.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path)
            if ds.SeriesInstanceUID == full_uid:
                del ds.PatientWeight
                ds.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.INFO):
        result = site_module.prepare_site(export.root, tmp_path / "site", progress=False,
                                          keep_key=tmp_path / "key.csv")
    study = {uid: name for name, uid in _key(tmp_path / "key.csv").items()}[
        export.study_of["sub-002"]]
    assert len(result.rows) == 6 and study not in {r["full_count"][:-17] for r in result.rows}
    notes = [n for n in result.skipped if n.where == study]
    assert [n.series for n in notes] == ["series 1 (48 images)", "series 2 (48 images)",
                                         "series 3 (48 images)"]
    assert notes[0].reason == ("cannot be read: PatientWeight (0010,1030) is missing or zero; "
                               "the export must carry the patient's weight")
    assert [n.reason for n in notes[1:]] == ["its full-count series 1 (48 images) cannot be "
                                             "read"] * 2
    assert f"{study} series 1 (48 images): cannot be read: PatientWeight" in caplog.text


def _derived_extra(subject: Path, index: int, export) -> None:
    """Beside the originals: fed-ndif's output made from the first subject's full count (its
    frame duration is the full count's, so it would make the full count ambiguous), and another
    vendor's processed copy of the second subject's 10 % series (ImageType left ORIGINAL, its
    frame duration the 10 % one's, so it would pair as one more low-count scan)."""
    if index == 0:
        volume, info = read_pet_series(subject / "dicom" / "full_count")
        out = write_pet_series(Volume(volume.array * 0.9, volume.affine),
                               export.root.parent / "derived", template=info,
                               series_description="fed-ndif denoised",
                               derivation_description="denoised by fed-ndif")
        for k, path in enumerate(sorted(out.iterdir())):
            ds = pydicom.dcmread(path)
            export.phi |= plant_identity(ds, index)
            ds.save_as(export.root / f"DRV{k:04d}", enforce_file_format=True)
    elif index == 1:
        def vendor(ds):
            item = pydicom.Dataset()
            code = pydicom.Dataset()
            code.CodeValue, code.CodingSchemeDesignator = "109102", "DCM"
            code.CodeMeaning = "Processing Equipment"
            item.PurposeOfReferenceCodeSequence = pydicom.Sequence([code])
            item.Manufacturer = "OtherVendor DL denoiser"
            ds.ContributingEquipmentSequence = pydicom.Sequence([item])
            ds.ActualFrameDuration = round(FULL_FRAME_MS * 0.1)

        copy_series(subject, "low_count_10pct", export.root, index, export, edit=vendor,
                    number=9)


def test_derived_series_beside_the_originals_change_nothing(simulated, salt, tmp_path):
    plain = build_export(simulated, tmp_path / "plain")
    mixed = build_export(simulated, tmp_path / "mixed" / "export", extra=_derived_extra)
    # The same studies and identities: the two exports differ only by the derived series.
    assert main(["prepare-site", str(plain.root), str(tmp_path / "a"), "--salt", str(salt)]) == 0
    assert main(["prepare-site", str(mixed.root), str(tmp_path / "b"), "--salt", str(salt)]) == 0
    rows_a = (tmp_path / "a" / "manifest.csv").read_text()
    rows_b = (tmp_path / "b" / "manifest.csv").read_text()
    assert len(rows_a.splitlines()) == 9  # 4 studies x 2 levels, and the header
    assert rows_b == rows_a
    summary = json.loads((tmp_path / "b" / "prepare.json").read_text())
    reasons = sorted(n["reason"] for n in summary["skipped"])
    assert len(reasons) == 2, reasons
    assert reasons[0].startswith("a post-processed series (processing equipment: OtherVendor")
    assert reasons[1].startswith("fed-ndif's own output")
    assert all(r.endswith("never paired") for r in reasons)
    assert json.loads((tmp_path / "a" / "prepare.json").read_text())["skipped"] == []


SALTS = ("5a" * 32, "c3" * 32)


def test_the_subject_order_follows_the_site_salt_not_the_ids(simulated, tmp_path):
    """Whoever holds the cohort's MRNs cannot rebuild the key: the order is a keyed hash under
    the site's salt. Each salt gives its own order (the same salt the same one), the file is
    the owner's only and made once, beside the key."""
    export = build_export(simulated, tmp_path / "export")
    ids = {export.study_of[s]: f"MRN{9_400_000 + i}" for i, s in enumerate(sorted(
        export.study_of))}
    unsalted = {f"sub-{n:03d}": uid for n, uid in enumerate(sorted(
        ids, key=lambda u: hashlib.sha256(ids[u].encode()).hexdigest()), start=1)}
    orders = []
    for n, text in enumerate((*SALTS, None)):
        key = tmp_path / f"key{n}.csv"
        if text is not None:
            (tmp_path / f"key{n}.csv.salt").write_text(text + "\n")
        site_module.prepare_site(export.root, tmp_path / f"site{n}", keep_key=key,
                                 progress=False)
        orders.append({name.split("/")[0]: uid for name, uid in _key(key).items()})
    assert len({tuple(sorted(o.items())) for o in orders}) == 3
    assert unsalted not in orders
    fresh = tmp_path / "key2.csv.salt"
    assert fresh.stat().st_mode & 0o777 == 0o600 and len(bytes.fromhex(fresh.read_text())) == 32
    assert not list((tmp_path / "site2").rglob("*.salt"))
    before = fresh.read_text()
    site_module.prepare_site(export.root, tmp_path / "site2", keep_key=tmp_path / "key2.csv",
                             overwrite=True, progress=False)
    assert fresh.read_text() == before
    assert {n.split("/")[0]: u for n, u in _key(tmp_path / "key2.csv").items()} == orders[2]


def test_malformed_dates_reach_neither_the_summary_nor_the_log(simulated, tmp_path, caplog,
                                                               capsys):
    """pydicom quotes a malformed DA in its errors and warnings: the skipped series' reason
    says what is malformed, never the value, and no UID, date or path of the export is in
    prepare.json or the log."""
    export = build_export(simulated, tmp_path / "export")
    full_uid = export.series[("sub-002", "full_count")]
    for path in export.root.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path)
            if ds.SeriesInstanceUID == full_uid:
                ds.SeriesDate = "1951X2"
                ds.save_as(path, enforce_file_format=True)
    caplog.clear()  # pydicom warned (and logged) the value while this test wrote it
    capsys.readouterr()
    with caplog.at_level(logging.DEBUG):
        assert main(["prepare-site", str(export.root), str(tmp_path / "site"), "--keep-key",
                     str(tmp_path / "key.csv")]) == 0
    out, err = capsys.readouterr()
    summary = (tmp_path / "site" / "prepare.json").read_text()
    reasons = [n["reason"] for n in json.loads(summary)["skipped"]]
    assert any("SeriesDate/SeriesTime is malformed (not a valid DICOM date/time" in r
               for r in reasons), reasons
    text = summary + caplog.text + out + err
    planted = _dates_and_paths(export.root) | export.phi
    assert "1951X2" in planted and not sorted(t for t in planted if t in text)
