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
