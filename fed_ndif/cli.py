"""The ``fed-ndif`` command: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fed_ndif.errors import FedNdifError

log = logging.getLogger("fed_ndif")


def _make_sites(args: argparse.Namespace) -> None:
    from fed_ndif.data.sites import make_sites

    make_sites(Path(args.out), overrides=args.overrides, overwrite=args.overwrite,
               montage=Path(args.montage) if args.montage else None)


def _convert(args: argparse.Namespace) -> None:
    """DICOM PET series -> SUV NIfTI; checks everything before writing anything."""
    from fed_ndif.data.dicom import check_weight_and_dose, read_pet_series
    from fed_ndif.data.nifti import save_nifti

    out = Path(args.output)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise FedNdifError(f"{out}: the output must be a .nii or .nii.gz file")
    if out.exists() and not args.overwrite:
        raise FedNdifError(f"{out} exists; pass --overwrite to replace it")
    dose_bq = args.dose * 1e6 if args.dose is not None else None
    check_weight_and_dose(args.weight, dose_bq)
    volume, _ = read_pet_series(Path(args.input), series_uid=args.series_uid,
                                patient_weight_kg=args.weight, injected_dose_bq=dose_bq)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(volume, out)
    log.info("wrote %s (SUV)", out)


def _prepare_site(args: argparse.Namespace) -> None:
    from fed_ndif.data.prepare import prepare_site

    prepare_site(Path(args.export), Path(args.site_dir), pairs_file=args.pairs, val=args.val,
                 test=args.test, seed=args.seed, keep_key=args.keep_key, salt=args.salt,
                 overwrite=args.overwrite)


def _train_local(args: argparse.Namespace) -> None:
    from fed_ndif.checkpoints import LAST_CHECKPOINT
    from fed_ndif.training.trainer import train_local

    summary = train_local(Path(args.manifest), Path(args.out_dir), overrides=args.overrides,
                          resume=args.resume)
    log.info("finished at step %d; checkpoint %s", int(summary.get("step", 0)),
             Path(args.out_dir) / LAST_CHECKPOINT)


def _denoise(args: argparse.Namespace) -> None:
    from fed_ndif.inference import denoise_study

    result = denoise_study(
        Path(args.input), Path(args.output), checkpoint=Path(args.checkpoint), steps=args.steps,
        samples=args.samples, sampler_name=args.sampler, warm_start=args.warm_start,
        uncertainty=args.uncertainty, output_format=args.format,
        liver_mask=Path(args.liver_mask) if args.liver_mask else None, nstd=args.nstd,
        device=args.device,
        precision=args.precision, overwrite=args.overwrite, weight_kg=args.weight,
        dose_bq=args.dose * 1e6 if args.dose is not None else None, series_uid=args.series_uid,
        seed=args.seed, batch_size=args.batch_size, progress=True, engine=args.engine,
        threads=args.threads,
    )
    log.info("%s", result.summary())


def _serve(args: argparse.Namespace) -> None:
    from fed_ndif.node.config import NodeConfig
    from fed_ndif.node.service import run_node

    run_node(NodeConfig(
        checkpoint=Path(args.checkpoint), ae_title=args.ae_title, port=args.port,
        destination=args.destination, spool=Path(args.spool), host=args.host,
        settle_s=args.settle_seconds, allow_any=args.allow_any,
        allow=[title for value in args.allow for title in value.split(",") if title.strip()],
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_ca=Path(args.tls_ca) if args.tls_ca else None,
        destination_tls=args.destination_tls, steps=args.steps, samples=args.samples,
        sampler=args.sampler, device=args.device, precision=args.precision,
        batch_size=args.batch_size, seed=args.seed, engine=args.engine, threads=args.threads))


def _simulate(args: argparse.Namespace) -> None:
    from fed_ndif.simulate import simulate

    report = simulate(args.overrides)
    print(f"report: {report}")


def _finetune(args: argparse.Namespace) -> None:
    from fed_ndif.checkpoints import BEST_CHECKPOINT, LAST_CHECKPOINT
    from fed_ndif.training.trainer import finetune

    finetune(Path(args.checkpoint), Path(args.manifest), Path(args.out_dir), steps=args.steps,
             lr=args.lr, device=args.device, val_every=args.val_every, patience=args.patience)
    chosen = BEST_CHECKPOINT if args.val_every else LAST_CHECKPOINT
    print(f"personalized checkpoint: {Path(args.out_dir) / chosen}")


def _evaluate(args: argparse.Namespace) -> None:
    from fed_ndif.config import load_config
    from fed_ndif.evaluation.compare import evaluate_site
    from fed_ndif.evaluation.detectability import DetectionTask

    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FedNdifError(f"--model {item!r}: expected NAME=CHECKPOINT")
        models[name] = Path(path)
    report = evaluate_site(Path(args.manifest), Path(args.out_dir), models=models,
                           filters=not args.no_filters, split=args.split, device=args.device,
                           overwrite=args.overwrite, reference=args.reference,
                           count_levels=args.count_level,
                           detection=None if args.no_detectability else DetectionTask.from_config(
                               load_config("simulate").compare.detectability))
    print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fed-ndif",
        description="Federated noise-embedded 2.5D diffusion models for low-count PET.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "make-sites", help="write simulated hospital sites (NIfTI, masks, manifest)",
        description="Simulate N PET sites (phantoms, scanner physics, OSEM) into OUT. Settings "
                    "are hydra overrides of configs/make_sites.yaml, e.g. sites=tiny seed=3 "
                    "sites.site_a.subjects=5.",
    )
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="hydra config overrides")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--montage", metavar="PNG", help="also write a picture of the sites")
    p.set_defaults(func=_make_sites)

    p = sub.add_parser(
        "convert", help="convert a PET DICOM series to an SUV NIfTI volume",
        description="Read the PET series in INPUT_DICOM_DIR (searched recursively; other series "
                    "and stray files are ignored) and write it in SUV (body weight) as NIfTI.",
    )
    p.add_argument("input", metavar="INPUT_DICOM_DIR", help="folder holding the DICOM files")
    p.add_argument("output", metavar="OUTPUT.nii.gz", help="NIfTI file to write")
    p.add_argument("--series-uid", metavar="UID", help="SeriesInstanceUID of the PET series to "
                   "read when the folder holds several")
    p.add_argument("--weight", type=float, metavar="KG", help="patient weight in kg (replaces "
                   "or supplies PatientWeight)")
    p.add_argument("--dose", type=float, metavar="MBQ", help="injected dose in MBq at the "
                   "injection time (replaces or supplies RadionuclideTotalDose)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "prepare-site", help="turn a hospital's DICOM export into a site folder (no PHI)",
        description="Scan EXPORT_DIR (any layout: DICOMDIR, opaque names, other modalities), "
                    "pair each low-count PET series with the full-count series of its study "
                    "(same frame of reference and grid; count fraction from frame durations or "
                    "counts, else from --pairs) and write SITE_DIR: SUV NIfTI volumes, "
                    "manifest.csv (pseudonymous subjects, splits by subject, masks blank) and "
                    "prepare.json (the summary). Nothing that identifies a patient is written or "
                    "logged. Interrupted runs continue where they stopped when run again.",
    )
    p.add_argument("export", metavar="EXPORT_DIR", help="the DICOM export (searched recursively)")
    p.add_argument("site_dir", metavar="SITE_DIR", help="the site folder to write (must not "
                   "exist unless --overwrite)")
    p.add_argument("--pairs", metavar="CSV", help="pairs the headers cannot tell: columns "
                   "low_count_series_uid, full_count_series_uid, count_level (a fraction)")
    p.add_argument("--val", type=int, default=1, metavar="N", help="subjects in the validation "
                   "split (default 1)")
    p.add_argument("--test", type=int, default=1, metavar="N", help="subjects in the test split "
                   "(default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split draw (default 0)")
    p.add_argument("--keep-key", metavar="FILE", help="also write a CSV mapping pseudonyms to "
                   "StudyInstanceUIDs (identifying: keep it outside the site folder, safe)")
    p.add_argument("--salt", metavar="FILE", help="the site's secret salt for the subject "
                   "order (made on the first run, reused after; default: beside --keep-key, "
                   "KEY.salt); one of --salt and --keep-key is needed; never in the site folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SITE_DIR")
    p.set_defaults(func=_prepare_site, resumable=True)

    p = sub.add_parser(
        "train-local", help="train a model on one site's manifest (no federation)",
        description="Train the noise-embedded diffusion model (or model.kind=unet) on one "
                    "site. Settings are hydra overrides of configs/train_local.yaml, e.g. "
                    "model=tiny train.steps=500 data.count_levels=[0.1].",
    )
    p.add_argument("manifest", help="the site's manifest.csv")
    p.add_argument("out_dir", help="folder for last.pt, config.yaml and metrics.jsonl")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="hydra config overrides")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    p.set_defaults(func=_train_local)

    p = sub.add_parser(
        "denoise", help="denoise a low-count PET study with a trained checkpoint",
        description="Denoise the PET study INPUT (a DICOM folder, searched recursively as "
                    "'convert' does, or an SUV NIfTI volume) with a trained fed-ndif checkpoint. "
                    "DICOM output: OUTPUT is a folder holding the derived series denoised/ (same "
                    "study, new series) and, with --uncertainty, uncertainty/; --format both adds "
                    "denoised.nii.gz (and uncertainty.nii.gz) to it. NIfTI output: OUTPUT is a "
                    ".nii.gz file (the map goes to OUTPUT_uncertainty.nii.gz). Everything is "
                    "checked before sampling starts, and nothing is left behind on failure. "
                    "See docs/denoise.md.",
    )
    p.add_argument("input", metavar="INPUT", help="DICOM folder or .nii/.nii.gz volume in SUV")
    p.add_argument("output", metavar="OUTPUT", help="output folder (dicom, both) or .nii.gz file "
                   "(nifti); must not exist unless --overwrite, nor lie inside INPUT")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="trained checkpoint "
                   "(.pt from train-local or the federation; read without executing code)")
    p.add_argument("--steps", type=int, metavar="N", help="sampling steps (network evaluations "
                   "per slice and sample); default: the checkpoint's sampler setting")
    p.add_argument("--sampler", choices=("dpmpp_2m", "ddim", "ddpm"), help="sampler; default: "
                   "the checkpoint's (shipped configs: dpmpp_2m, DPM-Solver++(2M), 3 steps)")
    p.add_argument("--samples", type=int, metavar="K", help="samples averaged per slice; "
                   "default: the checkpoint's sampler setting (1 on the shipped configs)")
    p.add_argument("--warm-start", metavar="STEP|none", help="start sampling from the low-count "
                   "input noised to diffusion step STEP (shipped configs: 150, which keeps lesion "
                   "uptake), or from pure noise with 'none'; default: the checkpoint's setting")
    p.add_argument("--uncertainty", action="store_true", help="also write the per-voxel std "
                   "over the samples (SUV) as its own series/file; needs --samples 2 or more")
    p.add_argument("--format", choices=("dicom", "nifti", "both"), help="output format; default: "
                   "dicom for a DICOM input, nifti for a NIfTI input (which cannot give DICOM)")
    p.add_argument("--liver-mask", metavar="NIFTI", help="liver mask on the input's voxel grid "
                   "(non-zero inside) for the liver NSTD; default: an automatic liver VOI, "
                   "checked for plausibility (right upper abdomen, volume, SUV, NSTD) and "
                   "refused when it fails")
    p.add_argument("--nstd", type=float, metavar="X", help="the input's liver NSTD, given "
                   "instead of measured (overrides the automatic VOI and its checks)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the "
                   "model runs; auto = cuda when available (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="network "
                   "precision; bf16 is for GPUs, the sampler stays float32 (default: fp32)")
    p.add_argument("--batch-size", type=int, metavar="B", help="slices per network "
                   "call; memory grows with it, not with the slice count (default: 4 on a CPU, "
                   "where small batches run fastest; 32 on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise; the same "
                   "seed gives the same output on the same device (default: 0)")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the network: eager PyTorch, or ONNX Runtime (float32 on a "
                   "CPU, faster); auto = onnxruntime on a CPU at fp32 (default: auto)")
    p.add_argument("--threads", type=int, metavar="T", help="CPU threads (default: every core "
                   "this process may use)")
    p.add_argument("--series-uid", metavar="UID", help="SeriesInstanceUID of the PET series to "
                   "denoise when the DICOM folder holds several")
    p.add_argument("--weight", type=float, metavar="KG", help="patient weight in kg (DICOM input; "
                   "replaces or supplies PatientWeight)")
    p.add_argument("--dose", type=float, metavar="MBQ", help="injected dose in MBq at injection "
                   "(DICOM input; replaces or supplies RadionuclideTotalDose)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT (only "
                   "once the new output is complete)")
    p.set_defaults(func=_denoise)

    p = sub.add_parser(
        "serve", help="run a DICOM node: receive studies, denoise PET series, send them on",
        description="Listen for C-ECHO and C-STORE (any storage class, compressed included). "
                    "Each PET series that has had no new instance for --settle-seconds is "
                    "denoised as 'denoise' does it, and the derived series (same study, new "
                    "series, UIDs fixed by the source) is sent by C-STORE to --destination, "
                    "retried until it is taken. Other series are dropped once their study has "
                    "settled. Everything waits in --spool, so a restart continues where the "
                    "node stopped. SIGTERM finishes the current step and stops. See "
                    "deploy/README.md.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="trained checkpoint")
    p.add_argument("--ae-title", required=True, metavar="AET", help="this node's AE title "
                   "(callers must address it)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (DICOM: 104 or "
                   "11112)")
    p.add_argument("--host", default="127.0.0.1", help="address of the interface to listen "
                   "on (default: 127.0.0.1, this machine only; the hospital network's address, "
                   "or 0.0.0.0 for every interface, must be given by name)")
    p.add_argument("--destination", required=True, metavar="AET@HOST:PORT", help="where "
                   "derived series are sent (the PACS)")
    p.add_argument("--spool", required=True, metavar="DIR", help="the node's queue on disk "
                   "(received instances, derived series, failed/ with reasons)")
    p.add_argument("--settle-seconds", type=float, default=10.0, metavar="S", help="a series "
                   "is complete when no instance of it arrived for S seconds (default: 10)")
    p.add_argument("--allow", nargs="+", default=[], metavar="CALLING_AET", help="accept "
                   "associations only from these calling AE titles (the scanner's, the PACS's; "
                   "space- or comma-separated); "
                   "the node refuses to start without --allow or --allow-any")
    p.add_argument("--allow-any", action="store_true", help="accept any calling AE title "
                   "(the start line warns about it); prefer --allow")
    p.add_argument("--tls-cert", metavar="PEM", help="this node's certificate: DICOM over TLS")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-ca", metavar="PEM", help="CA that callers' certificates must be "
                   "signed by (mutual TLS); also checks the destination with --destination-tls")
    p.add_argument("--destination-tls", action="store_true", help="send to the destination "
                   "over TLS (needs --tls-ca)")
    p.add_argument("--steps", type=int, metavar="N", help="as for denoise")
    p.add_argument("--samples", type=int, metavar="K", help="as for denoise")
    p.add_argument("--sampler", choices=("dpmpp_2m", "ddim", "ddpm"), help="as for denoise")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="as for denoise (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="as for denoise (default: fp32)")
    p.add_argument("--batch-size", type=int, metavar="B", help="as for denoise")
    p.add_argument("--seed", type=int, default=0, help="as for denoise (default: 0)")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="as for denoise (default: auto)")
    p.add_argument("--threads", type=int, metavar="T", help="as for denoise")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "simulate", help="simulated multi-site federated run on this machine",
        description="Make synthetic sites (if missing) and run the Fed-NDIF federation over them "
                    "with Flower's simulation engine, one virtual node per site. Settings are "
                    "hydra overrides of configs/simulate.yaml, e.g. experiment=tiny "
                    "out_dir=runs/tiny fl.rounds=5.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="hydra config overrides")
    p.set_defaults(func=_simulate)

    p = sub.add_parser(
        "finetune", help="personalize a (global) checkpoint on one site's training data",
        description="Fine-tune CHECKPOINT on the training split of MANIFEST into OUT_DIR/last.pt; "
                    "model, diffusion and normalization settings come from the checkpoint. With "
                    "--val-every, OUT_DIR/best.pt is the best of the checkpoint itself and its "
                    "fine-tuned steps on the site's validation split (selection.json says which).",
    )
    p.add_argument("checkpoint", help="the federation's global checkpoint (or any fed-ndif .pt)")
    p.add_argument("manifest", help="the site's manifest.csv")
    p.add_argument("out_dir", help="folder for last.pt, config.yaml and metrics.jsonl")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: checkpoint's)")
    p.add_argument("--val-every", type=int, default=None, metavar="N",
                   help="score the validation split every N steps and keep the best model")
    p.add_argument("--patience", type=int, default=0, metavar="K",
                   help="with --val-every: stop after K checks without a gain (default 0: never)")
    p.set_defaults(func=_finetune)

    p = sub.add_parser(
        "evaluate", help="score models and classical filters on a site's held-out studies",
        description="Evaluate the low-count input, Gaussian and non-local-means filters (tuned on "
                    "the validation split) and each --model on MANIFEST's test split: PSNR, "
                    "SSIM, NMSE, lesion SUV bias, contrast recovery, CNR and liver NSTD. Writes "
                    "metrics.csv, report.md and figures/ into OUT_DIR.",
    )
    p.add_argument("manifest", help="the site's manifest.csv")
    p.add_argument("out_dir", help="folder for the results (must be new or empty)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a checkpoint to evaluate under NAME (repeatable)")
    p.add_argument("--no-filters", action="store_true", help="skip the Gaussian and NLM baselines")
    p.add_argument("--no-detectability", action="store_true",
                   help="skip the small-lesion model observer (compare.detectability settings)")
    p.add_argument("--count-level", type=float, action="append", metavar="FRACTION",
                   help="score only studies at this count level, e.g. 0.1 (repeatable; default: "
                        "all)")
    p.add_argument("--reference", metavar="NAME",
                   help="pair every method against this --model: per-subject differences with "
                        "95 %% CIs, in report.md and figures/paired_differences.png")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "coordinator", help="run the federation's server (SuperLink with TLS + node auth)",
        description="Start a SuperLink with TLS and SuperNode authentication, register the "
                    "sites' public keys and run (or, with --resume, continue) the Fed-NDIF "
                    "federation. Settings are hydra overrides of configs/federated.yaml, e.g. "
                    "fl.rounds=50 fl.min_sites=3 (right after RUN_DIR, before the options). "
                    "RUN_DIR keeps the config, the SuperLink's "
                    "state, checkpoints, metrics.jsonl and logs. See deploy/README.md.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="hydra config overrides")
    p.add_argument("--certs", default="certs", metavar="DIR", help="folder with ca.crt, "
                   "server.crt and server.key from scripts/make-certs (default: certs)")
    p.add_argument("--register", action="append", default=[], metavar="KEY.pub", help="a site's "
                   "public key to register (repeatable; keys registered before are kept)")
    p.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on; "
                   "0.0.0.0 for other machines (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=9092, help="the SuperLink's port (default: 9092)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its "
                   "latest global checkpoint")
    p.add_argument("--wait-for-sites", type=int, default=None, metavar="N", help="start the "
                   "run once N sites are online (default: fl.min_sites; 0: do not wait)")
    p.add_argument("--wait-for-sites-timeout", type=float, default=600.0, metavar="S",
                   help="how long the run waits for sites, before it and whenever a round "
                   "lacks fl.min_sites; then it starts with fl.min_sites if that many are "
                   "online, else fails (default: 600)")
    p.add_argument("--secure-aggregation", action="store_true", help="the coordinator receives "
                   "only the masked sum of the sites' updates (Flower's SecAgg+; the same as "
                   "fl.secure_aggregation=true; see deploy/README.md)")
    p.add_argument("--state-db", action="store_true", help="keep the SuperLink's state in "
                   "RUN_DIR/state.db instead of memory (SQLite: can answer 'database is locked' "
                   "on a busy machine)")
    p.set_defaults(func=_coordinator)

    p = sub.add_parser(
        "site", help="join a federation as a site (a SuperNode with TLS and the site's key)",
        description="Start this site's SuperNode and keep it running: it connects to the "
                    "coordinator over TLS, authenticates with the site's private key and trains "
                    "on DATA only; it is restarted whatever ends it (a coordinator restart, a "
                    "lost connection) until SIGTERM or Ctrl-C, and says in one line why it "
                    "cannot connect. Only weights and numeric metrics leave the site. See "
                    "deploy/README.md.",
    )
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator")
    p.add_argument("--ca", required=True, metavar="CA.crt", help="the federation's CA "
                   "certificate (from the coordinator)")
    p.add_argument("--key", required=True, metavar="KEY", help="this site's private node key "
                   "(its .pub is registered with the coordinator)")
    p.add_argument("--data", required=True, metavar="DIR", help="the site's data folder (with "
                   "manifest.csv) or manifest file")
    p.add_argument("--name", help="site name reported with metrics (default: the data folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's "
                   "ClientApp API; distinct per SuperNode on one host (default: 9094)")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="S", help="seconds "
                   "between asks for work when idle (Flower's own: 3; default: 1)")
    p.add_argument("--no-warm-pool", dest="warm_pool", action="store_false", help="start a "
                   "fresh ClientApp process per message, as Flower does (default: a warm "
                   "pool that imports torch once and forks per message; fed_ndif.runtime.prefork)")
    p.add_argument("--require-secure-aggregation", action="store_true", help="train only in "
                   "rounds with secure aggregation (SecAgg+): a coordinator that asks for a "
                   "plain update is refused, whatever its settings")
    p.set_defaults(func=_site)
    return parser


def _coordinator(args: argparse.Namespace) -> None:
    from fed_ndif.runtime.coordinator import run_coordinator

    overrides = [*args.overrides, *(["fl.secure_aggregation=true"]
                                    if args.secure_aggregation else [])]
    out = run_coordinator(Path(args.run_dir), overrides, certs_dir=Path(args.certs),
                          site_keys=[Path(k) for k in args.register], host=args.host,
                          port=args.port, resume=args.resume, wait_sites=args.wait_for_sites,
                          wait_timeout_s=args.wait_for_sites_timeout, state_db=args.state_db)
    log.info("federation finished: run folder %s", out)


def _site(args: argparse.Namespace) -> None:
    from fed_ndif.runtime.site import run_site

    run_site(superlink=args.superlink, ca=Path(args.ca), key=Path(args.key),
             data=Path(args.data), name=args.name, device=args.device, port=args.port,
             poll_s=args.poll_interval, warm_pool=args.warm_pool,
             require_secure=args.require_secure_aggregation)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A service's log lines need their time; a command's output does not.
    stamp = "%(asctime)s " if args.command == "serve" else ""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=stamp + "%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except FedNdifError as exc:
        print(f"fed-ndif {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine's fault (a full disk, an I/O error), not the input's: one line, and no
        # file name, which in an export folder may name a patient.
        reason = exc.strerror or str(exc) or exc.__class__.__name__
        print(f"fed-ndif {args.command}: error: {reason}"
              f"{f' (errno {exc.errno})' if exc.errno else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = ("the work done is kept aside; run the same command again to continue"
                if getattr(args, "resumable", False) else "no partial output was kept")
        print(f"fed-ndif {args.command}: interrupted; {kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
