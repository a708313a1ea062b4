"""SUV <-> network units; saved in every checkpoint, so inference inverts what training did."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fed_ndif.errors import FedNdifError


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
    benchmark measured (BENCHMARKS.md, "why normalization is 1 SUV/unit"): lesion peaks 24 %
    low whatever the sampler; 1 SUV per unit restored the dependence on x_t. No offset: 0 SUV
    (air) stays 0, and the samplers clamp predicted x0 to ``[clip_min, clip_max] / scale``
    (non-negative activity). Checkpoints carry it, so inference inverts exactly what training did.
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


