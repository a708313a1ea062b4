"""``fed-ndif denoise``: end to end on synthetic DICOM and NIfTI studies, and hostile inputs."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from fed_ndif.checkpoints import sampler_config
from fed_ndif.cli import main
from fed_ndif.data.dicom import read_pet_series
from fed_ndif.data.nifti import load_nifti
from fed_ndif.data.nstd import measure_liver_nstd
from fed_ndif.data.sites import make_sites
from fed_ndif.inference import load_model
from fed_ndif.models.denoise_volume import denoise_volume
from fed_ndif.training.trainer import train_local
from tests.helpers.tools import require_tool


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Tiny synthetic sites with DICOM and a tiny diffusion checkpoint trained on site_a."""
    root = tmp_path_factory.mktemp("denoise")
    manifests = make_sites(root / "sites", overrides=[
        "sites=tiny", "write_dicom=true", "sites.site_b.subjects=1", "sites.site_c.subjects=1"])
    train_local(manifests[0], root / "train", overrides=[
        "model=tiny", "train.steps=4", "train.batch_size=2", "train.val_every=0",
        "train.val_max_studies=1", "train.device=cpu"])
    subject = root / "sites" / "site_a" / "sub-003"
    return {"ckpt": root / "train" / "last.pt", "subject": subject,
            "dicom": subject / "dicom" / "low_count_5pct",
            "nifti": subject / "low_count_5pct.nii.gz", "mask": subject / "liver_mask.nii.gz"}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(["denoise", *argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("fed-ndif denoise:")]


def _quantization_bound(array: np.ndarray) -> np.ndarray:
    """Half a quantization step per slice (slope = max|slice| / 32767), plus float32 slack."""
    peak = np.abs(array).reshape(array.shape[0], -1).max(axis=1)
    return (peak / 32767 * 0.5 + 1e-5 * peak + 1e-6)[:, None, None]


def _direct(trained, volume, *, steps: int, samples: int, seed: int = 0, **sampler):
    """denoise_volume called directly, as the command should call it (same engine)."""
    loaded = load_model(trained["ckpt"], device="cpu")
    bundle = loaded.state
    nstd, _ = measure_liver_nstd(volume, load_nifti(trained["mask"]).array > 0)
    return denoise_volume(loaded.network, volume.array, nstd=nstd,
                          normalization=bundle.normalization, k=bundle.k, process=bundle.process,
                          sampler=sampler_config(bundle.cfg, steps=steps, samples=samples,
                                                 **sampler),
                          device="cpu", seed=seed, progress=False)


@pytest.fixture(scope="module")
def dicom_run(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dicom_out") / "out"
    code = main(["denoise", str(trained["dicom"]), str(out), "--checkpoint", str(trained["ckpt"]),
                 "--format", "both", "--steps", "3", "--samples", "2", "--uncertainty",
                 "--liver-mask", str(trained["mask"]), "--device", "cpu"])
    assert code == 0
    return out


def test_dicom_output_layout_and_values(trained, dicom_run):
    out = dicom_run
    assert sorted(p.name for p in out.iterdir()) == [
        "denoised", "denoised.nii.gz", "uncertainty", "uncertainty.nii.gz"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
    source, source_info = read_pet_series(trained["dicom"])
    denoised, info = read_pet_series(out / "denoised")
    nifti = load_nifti(out / "denoised.nii.gz")
    np.testing.assert_allclose(denoised.affine, source.affine, atol=1e-6)
    np.testing.assert_allclose(nifti.affine, source.affine, atol=1e-6)
    assert np.all(np.abs(denoised.array - nifti.array) <= _quantization_bound(nifti.array))
    mean, std = _direct(trained, source, steps=3, samples=2)
    np.testing.assert_allclose(nifti.array, mean, atol=1e-5)
    assert not np.allclose(nifti.array, source.array, atol=1e-3)  # the model changed something
    spread, _ = read_pet_series(out / "uncertainty")
    np.testing.assert_allclose(load_nifti(out / "uncertainty.nii.gz").array, std, atol=1e-5)
    assert np.all(np.abs(spread.array - std) <= _quantization_bound(std))
    assert std.min() >= 0 and std.max() > 0
    # Same study and frame of reference, new series and instances, DERIVED, says what made it.
    assert info.study_uid == source_info.study_uid
    assert info.frame_of_reference_uid == source_info.frame_of_reference_uid
    assert info.series_uid != source_info.series_uid
    assert not set(info.sop_instance_uids) & set(source_info.sop_instance_uids)
    header = pydicom.dcmread(next((out / "denoised").iterdir()), stop_before_pixels=True)
    assert list(header.ImageType)[:2] == ["DERIVED", "PRIMARY"]
    assert "fed-ndif" in header.SeriesDescription and "3x2" in header.SeriesDescription
    assert "last.pt" in header.DerivationDescription
    assert "3 steps x 2 samples" in header.DerivationDescription
    numbers = {int(pydicom.dcmread(next((out / s).iterdir()), stop_before_pixels=True)
                   .SeriesNumber) for s in ("denoised", "uncertainty")}
    assert len(numbers) == 2


def test_dicom_output_passes_dciodvfy(dicom_run):
    tool = require_tool("dciodvfy")
    problems = []
    for series in ("denoised", "uncertainty"):
        for path in sorted((dicom_run / series).iterdir()):
            run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
            problems += [f"{path.name}: {line}" for line in (run.stdout + run.stderr).splitlines()
                         if line.startswith("Error")]
    assert problems == []


def test_dcm2niix_converts_to_the_input_geometry(trained, dicom_run, tmp_path):
    tool = require_tool("dcm2niix")
    subprocess.run([tool, "-z", "y", "-b", "n", "-f", "converted", "-o", str(tmp_path),
                    str(dicom_run / "denoised")], check=True, capture_output=True, timeout=120)
    (path,) = tmp_path.glob("converted*.nii.gz")
    converted = nib.as_closest_canonical(nib.load(path))
    source = nib.as_closest_canonical(nib.load(trained["nifti"]))
    np.testing.assert_allclose(converted.affine, source.affine, atol=1e-3)
    assert converted.shape == source.shape
    ours = nib.as_closest_canonical(nib.load(dicom_run / "denoised.nii.gz"))
    _, info = read_pet_series(dicom_run / "denoised")
    theirs = np.asarray(converted.dataobj, np.float64) * info.suv_factor  # dcm2niix keeps Bq/ml
    expected = np.asarray(ours.dataobj, np.float64)
    np.testing.assert_allclose(theirs, expected, atol=np.abs(expected).max() / 32767 + 1e-4)


def test_nifti_input_gives_nifti_output(trained, tmp_path, capsys):
    out = tmp_path / "den.nii.gz"
    code, errors = _run([str(trained["nifti"]), str(out), "--checkpoint", str(trained["ckpt"]),
                         "--steps", "2", "--samples", "2", "--uncertainty", "--seed", "3",
                         "--liver-mask", str(trained["mask"])], capsys)
    assert code == 0 and errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den.nii.gz", "den_uncertainty.nii.gz"]
    source = load_nifti(trained["nifti"])
    result = load_nifti(out)
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-6)
    mean, std = _direct(trained, source, steps=2, samples=2, seed=3)
    np.testing.assert_allclose(result.array, mean, atol=1e-5)
    np.testing.assert_allclose(load_nifti(tmp_path / "den_uncertainty.nii.gz").array, std,
                               atol=1e-5)


def test_sampler_option_replaces_the_checkpoints_sampler(trained, tmp_path, capsys):
    source = load_nifti(trained["nifti"])
    outputs = {}
    for name in ("ddim", None):
        out = tmp_path / f"{name}.nii.gz"
        code, errors = _run([str(trained["nifti"]), str(out), "--checkpoint",
                             str(trained["ckpt"]), "--steps", "3", "--liver-mask",
                             str(trained["mask"]), *(["--sampler", name] if name else [])],
                            capsys)
        assert code == 0 and errors == []
        outputs[name] = load_nifti(out).array
    ddim, _ = _direct(trained, source, steps=3, samples=1, name="ddim")
    default, _ = _direct(trained, source, steps=3, samples=1)
    np.testing.assert_allclose(outputs["ddim"], ddim, atol=1e-6)
    np.testing.assert_allclose(outputs[None], default, atol=1e-6)
    # DPM-Solver++ (the default) is not DDIM; this briefly trained network barely reads x_t, so
    # the two differ little (2.8e-5 SUV at most), but far more than the 1e-6 above.
    assert np.abs(ddim - default).max() > 1e-5


def test_warm_start_option_replaces_the_checkpoints_start(trained, tmp_path, capsys):
    source = load_nifti(trained["nifti"])
    outputs = {}
    for start in ("none", "40"):
        out = tmp_path / f"{start}.nii.gz"
        code, errors = _run([str(trained["nifti"]), str(out), "--checkpoint",
                             str(trained["ckpt"]), "--steps", "3", "--liver-mask",
                             str(trained["mask"]), "--warm-start", start], capsys)
        assert code == 0 and errors == []
        outputs[start] = load_nifti(out).array
    noise, _ = _direct(trained, source, steps=3, samples=1, warm_start="none", t_start=None)
    warm, _ = _direct(trained, source, steps=3, samples=1, warm_start="low_count", t_start=40)
    np.testing.assert_allclose(outputs["none"], noise, atol=1e-6)
    np.testing.assert_allclose(outputs["40"], warm, atol=1e-6)
    assert np.abs(noise - warm).max() > 1e-5
    for bad in ("1000", "-1", "soon"):
        code, errors = _run([str(trained["nifti"]), str(tmp_path / "bad.nii.gz"),
                             "--checkpoint", str(trained["ckpt"]), "--warm-start", bad,
                             "--liver-mask", str(trained["mask"])], capsys)
        assert code == 2 and len(errors) == 1 and f"--warm-start {bad}" in errors[0], errors
        assert not (tmp_path / "bad.nii.gz").exists()


def test_every_sampler_can_be_chosen_on_the_command_line():
    """The CLI lists the samplers itself (it imports no torch); it must offer each one."""
    from fed_ndif.cli import build_parser
    from fed_ndif.inference import SAMPLER_LABELS
    from fed_ndif.models.sampling import SAMPLERS

    assert sorted(SAMPLER_LABELS) == sorted(SAMPLERS)
    for name in SAMPLERS:
        args = build_parser().parse_args(["denoise", "in", "out", "--checkpoint", "c.pt",
                                              "--sampler", name])
        assert args.sampler == name

def test_dicom_default_format_and_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(trained["dicom"]), str(out), "--checkpoint", str(trained["ckpt"]), "--steps", "1",
            "--liver-mask", str(trained["mask"])]
    assert _run(argv, capsys) == (0, [])
    assert [p.name for p in out.iterdir()] == ["denoised"]
    first = sorted(p.name for p in (out / "denoised").iterdir())
    code, errors = _run(argv, capsys)
    assert code == 2 and len(errors) == 1 and "exists" in errors[0]
    assert _run([*argv, "--overwrite", "--seed", "1"], capsys) == (0, [])
    assert sorted(p.name for p in (out / "denoised").iterdir()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing else left


def _uids(series: Path) -> tuple[str, list[str]]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    return str(headers[0].SeriesInstanceUID), sorted(str(h.SOPInstanceUID) for h in headers)


def test_the_same_series_denoised_the_same_way_gets_the_same_uids(trained, tmp_path, capsys):
    """A PACS that receives the same derived series twice must keep one: its UIDs come from the
    source and the settings, not from chance; other settings give another series."""
    runs = {}
    for name, extra in (("a", []), ("b", []), ("other_seed", ["--seed", "5"])):
        out = tmp_path / name
        argv = [str(trained["dicom"]), str(out), "--checkpoint", str(trained["ckpt"]),
                "--steps", "1", "--liver-mask", str(trained["mask"]), *extra]
        assert _run(argv, capsys) == (0, [])
        runs[name] = _uids(out / "denoised")
    assert runs["a"] == runs["b"]
    assert runs["other_seed"][0] != runs["a"][0]
    assert not set(runs["other_seed"][1]) & set(runs["a"][1])
    assert len(set(runs["a"][1])) == len(runs["a"][1])


def _forged(trained, tmp_path: Path, change) -> Path:
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    change(ckpt)
    path = tmp_path / "forged.pt"
    torch.save(ckpt, path)
    return path


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _hostile(case: str, trained, tmp_path: Path) -> tuple[list[str], str]:
    """Arguments of one bad run (checkpoint files live in tmp_path/inputs) and the message."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ckpt = str(trained["ckpt"])
    out = str(tmp_path / "work" / "out")
    base = [str(trained["dicom"]), out, "--liver-mask", str(trained["mask"])]
    if case == "wrong_k":
        def set_k(c):
            c["config"]["model"]["k"] = 1
        return [*base, "--checkpoint", str(_forged(trained, inputs, set_k))], "do not fit"
    if case == "no_normalization":
        return ([*base, "--checkpoint", str(_forged(trained, inputs,
                                                    lambda c: c.pop("normalization")))],
                "normalization")
    if case == "corrupt":
        path = inputs / "corrupt.pt"
        path.write_bytes(trained["ckpt"].read_bytes()[:5000])
        return [*base, "--checkpoint", str(path)], "not a readable fed-ndif checkpoint"
    if case == "not_a_checkpoint":
        path = inputs / "other.pt"
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
        return [*base, "--checkpoint", str(path)], "not a fed-ndif checkpoint"
    if case == "code_in_pickle":
        path = inputs / "evil.pt"
        path.write_bytes(pickle.dumps({"kind": _Exploit()}, protocol=2))
        return [*base, "--checkpoint", str(path)], "not a readable fed-ndif checkpoint"
    if case == "missing_checkpoint":
        return [*base, "--checkpoint", str(inputs / "nope.pt")], "no such checkpoint"
    if case == "output_inside_input":
        return ([str(trained["dicom"]), str(trained["dicom"] / "den"), "--checkpoint", ckpt],
                "inside the input")
    if case == "output_is_input":
        return ([str(trained["nifti"]), str(trained["nifti"]), "--checkpoint", ckpt,
                 "--overwrite"], "replace the input")
    if case == "output_contains_input":
        return ([str(trained["dicom"]), str(trained["subject"]), "--checkpoint", ckpt,
                 "--overwrite"], "replace the input")
    if case == "existing_output":
        (tmp_path / "work" / "out").mkdir()
        (tmp_path / "work" / "out" / "keep.txt").write_text("keep")
        return [*base, "--checkpoint", ckpt], "exists"
    if case == "unwritable_output":
        if os.geteuid() == 0:  # root writes through chmod: use a path under a regular file
            (tmp_path / "work" / "file").write_text("a file")
            bad = [str(trained["dicom"]), str(tmp_path / "work" / "file" / "out")]
            return [*bad, "--checkpoint", ckpt], "not a folder"
        locked = tmp_path / "work" / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return ([str(trained["dicom"]), str(locked / "out"), "--checkpoint", ckpt],
                "not writable")
    if case == "nifti_to_dicom":
        return ([str(trained["nifti"]), out, "--checkpoint", ckpt, "--format", "dicom"],
                "--format nifti")
    if case == "uncertainty_one_sample":
        return [*base, "--checkpoint", ckpt, "--uncertainty", "--samples", "1"], "--samples 2"
    if case == "no_liver_found":  # tiny 8 mm voxels: the automatic VOI cannot find the liver
        return [str(trained["dicom"]), out, "--checkpoint", ckpt], "pass a liver mask"
    if case == "mask_on_other_grid":
        other = trained["subject"].parent.parent / "site_b" / "sub-001" / "liver_mask.nii.gz"
        return ([str(trained["dicom"]), out, "--checkpoint", ckpt, "--liver-mask", str(other)],
                "liver mask shape")
    if case == "nstd_and_mask":
        return ([str(trained["dicom"]), out, "--checkpoint", ckpt, "--nstd", "0.2",
                 "--liver-mask", str(trained["mask"])], "either --nstd or --liver-mask")
    if case == "our_own_output":  # a derived series of ours is never denoised again
        from fed_ndif.data.dicom import read_pet_series, write_pet_series

        volume, info = read_pet_series(trained["dicom"])
        write_pet_series(volume, inputs / "ours", template=info, series_description="d",
                         derivation_description="denoised by fed-ndif")
        return ([str(inputs / "ours"), out, "--checkpoint", ckpt, "--nstd", "0.2"],
                "fed-ndif's own output")
    if case == "cuda_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        return [*base, "--checkpoint", ckpt, "--device", "cuda"], "no CUDA device"
    raise AssertionError(case)


CASES = ["wrong_k", "no_normalization", "corrupt", "not_a_checkpoint", "code_in_pickle",
         "missing_checkpoint", "output_inside_input", "output_is_input", "output_contains_input",
         "existing_output", "unwritable_output", "nifti_to_dicom", "uncertainty_one_sample",
         "no_liver_found", "mask_on_other_grid", "nstd_and_mask", "our_own_output",
         "cuda_without_gpu"]


def test_nstd_overrides_the_automatic_liver_voi(trained, tmp_path, capsys):
    """Where no plausible liver VOI is found (these 8 mm voxels), the user's --nstd stands in:
    the same output as the model given that NSTD."""
    out = tmp_path / "den.nii.gz"
    code, errors = _run([str(trained["nifti"]), str(out), "--checkpoint", str(trained["ckpt"]),
                         "--steps", "2", "--nstd", "0.25"], capsys)
    assert code == 0 and errors == []
    loaded = load_model(trained["ckpt"], device="cpu")
    state = loaded.state
    mean, _ = denoise_volume(loaded.network, load_nifti(trained["nifti"]).array, nstd=0.25,
                             normalization=state.normalization, k=state.k, process=state.process,
                             sampler=sampler_config(state.cfg, steps=2), device="cpu", seed=0,
                             progress=False)
    np.testing.assert_allclose(load_nifti(out).array, mean, atol=1e-5)


def _listing(*folders: Path) -> list[tuple[str, int]]:
    return [(str(p), p.stat().st_size if p.is_file() else -1)
            for folder in folders for p in sorted(folder.rglob("*"))]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error_and_writes_nothing(case, trained, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    argv, message = _hostile(case, trained, tmp_path)
    before = _listing(tmp_path, trained["subject"])
    try:
        code, errors = _run(argv, capsys)
    finally:
        if (tmp_path / "work" / "locked").exists():
            (tmp_path / "work" / "locked").chmod(0o700)
    assert code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in errors[0]
    assert _listing(tmp_path, trained["subject"]) == before
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_nothing(existing, trained, tmp_path, capsys, monkeypatch):
    import fed_ndif.inference as inference

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # After sampling and after the DICOM series is written into the staging folder.
    monkeypatch.setattr(inference, "save_nifti", interrupt)
    out = tmp_path / "new" / "out"  # the missing parent folder is created, then removed
    if existing:
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("old output")
    before = _listing(tmp_path)
    code = main(["denoise", str(trained["dicom"]), str(out), "--checkpoint", str(trained["ckpt"]),
                 "--format", "both", "--steps", "1", "--liver-mask", str(trained["mask"]),
                 *(["--overwrite"] if existing else [])])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("fed-ndif denoise:")]
    assert code == 130 and len(err) == 1 and "interrupted" in err[0]
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("where", ["writing", "staging"])
def test_a_full_disk_is_one_line_leaves_nothing_and_is_not_called_bad_output(
        where, trained, tmp_path, capsys, monkeypatch):
    import errno

    import fed_ndif.inference as inference

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inference, "save_nifti" if where == "writing" else "staged_folder", full)
    out = tmp_path / "out"
    before = _listing(tmp_path)
    code = main(["denoise", str(trained["dicom"]), str(out), "--checkpoint", str(trained["ckpt"]),
                 "--format", "both", "--steps", "1", "--liver-mask", str(trained["mask"])])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("fed-ndif") or "Traceback" in line]
    assert code == 1 and err == ["fed-ndif denoise: error: No space left on device (errno 28)"]
    assert _listing(tmp_path) == before
    # The DICOM node retries what raises OSError (the disk may free up) and moves what raises
    # FedNdifError (the series' or output's own fault) to failed/: a full disk must be the first.
    with pytest.raises(OSError):
        inference.denoise_study(trained["dicom"], out, checkpoint=trained["ckpt"],
                                output_format="both", steps=1, progress=False,
                                liver_mask=trained["mask"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["denoise", "--help"])
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--steps", "--samples", "--uncertainty", "--format",
                   "--liver-mask", "--device", "--precision", "--overwrite", "--weight", "--dose",
                   "--series-uid", "--seed", "--batch-size", "--sampler", "--warm-start"):
        assert option in text
    assert text.count("\n  --") >= 15


def test_engine_and_threads_options_reach_the_network(trained, tmp_path, capsys, caplog):
    outputs = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / f"{engine}.nii.gz"
        with caplog.at_level("INFO"):
            code, errors = _run([str(trained["nifti"]), str(out), "--checkpoint",
                                 str(trained["ckpt"]), "--steps", "2", "--liver-mask",
                                 str(trained["mask"]), "--engine", engine, "--threads", "1"],
                                capsys)
        assert code == 0 and errors == []
        assert f"{engine}, 1 thread" in caplog.text
        outputs[engine] = load_nifti(out).array
    np.testing.assert_allclose(outputs["onnxruntime"], outputs["torch"], atol=1e-4)
    code, errors = _run([str(trained["nifti"]), str(tmp_path / "x.nii.gz"), "--checkpoint",
                         str(trained["ckpt"]), "--threads", "0"], capsys)
    assert code != 0 and any("--threads must be at least 1" in e for e in errors)


def test_derived_uids_follow_the_pixels():
    """The UIDs follow what the pixels are: the same pixels the same UIDs (whatever engine or
    thread count made them), pixels that differ in one float32 rounding step other UIDs."""
    from types import SimpleNamespace

    from fed_ndif.inference import derived_uid_sources

    info = SimpleNamespace(series_uid="1.2.3", sop_instance_uids=["1.2.3.1", "1.2.3.2"])
    pixels = np.random.default_rng(0).random((4, 8, 8), dtype=np.float32)
    rounded = pixels.copy()
    rounded[2, 3, 4] = np.nextafter(rounded[2, 3, 4], np.float32(2))
    assert derived_uid_sources(info, pixels) == derived_uid_sources(info, pixels.copy())
    assert derived_uid_sources(info, pixels) != derived_uid_sources(info, rounded)
    other = SimpleNamespace(series_uid="1.2.4", sop_instance_uids=["1.2.4.1"])
    assert derived_uid_sources(info, pixels) != derived_uid_sources(other, pixels)
