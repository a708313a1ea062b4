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
    import math

    from fed_ndif.data.dicom import read_pet_series
    from fed_ndif.data.nifti import save_nifti

    out = Path(args.output)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise FedNdifError(f"{out}: the output must be a .nii or .nii.gz file")
    if out.exists() and not args.overwrite:
        raise FedNdifError(f"{out} exists; pass --overwrite to replace it")
    for name, value in (("--weight", args.weight), ("--dose", args.dose)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FedNdifError(f"{name} must be a positive number, got {value:g}")
    volume, _ = read_pet_series(
        Path(args.input), series_uid=args.series_uid, patient_weight_kg=args.weight,
        injected_dose_bq=args.dose * 1e6 if args.dose is not None else None,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(volume, out)
    log.info("wrote %s (SUV)", out)


def _train_local(args: argparse.Namespace) -> None:
    from fed_ndif.training.trainer import train_local

    summary = train_local(Path(args.manifest), Path(args.out_dir), overrides=args.overrides,
                          resume=args.resume)
    log.info("finished at step %d; checkpoint %s", int(summary.get("step", 0)),
             Path(args.out_dir) / "last.pt")


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except FedNdifError as exc:
        print(f"fed-ndif {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fed-ndif {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
