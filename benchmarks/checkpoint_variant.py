"""A copy of a checkpoint with inference settings changed, to score one trained network under
several samplers or inference modes with `fed-ndif evaluate` (same weights, other settings).

    python benchmarks/checkpoint_variant.py runs/i16/patch/last.pt runs/i16/patch_avg4.pt \
        diffusion.sampler.samples=4
    python benchmarks/checkpoint_variant.py runs/i16/patch/last.pt runs/i16/patch_whole.pt \
        data.patch_size=null

Only settings that inference reads may change (the sampler, windowed inference); the network's
architecture, k and normalization stay, so the weights stay valid.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fed_ndif.checkpoints import read_checkpoint
from fed_ndif.staging import staged_file

CHANGEABLE = ("diffusion.sampler.", "data.patch_size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("overrides", nargs="+", metavar="key=value")
    args = parser.parse_args()
    ckpt = read_checkpoint(args.source)
    config = OmegaConf.create(copy.deepcopy(ckpt["config"]))
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(CHANGEABLE):
            parser.error(f"{item!r}: only {', '.join(CHANGEABLE)} settings may change")
        OmegaConf.update(config, key, OmegaConf.from_dotlist([f"v={value}"])["v"], merge=False)
    ckpt["config"] = OmegaConf.to_container(config)
    with staged_file(Path(args.target), suffix=".pt") as tmp:
        torch.save(ckpt, tmp)
    print(f"{args.target}: {', '.join(args.overrides)}")


if __name__ == "__main__":
    main()
