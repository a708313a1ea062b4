"""Where the network runs at inference: eager PyTorch, or ONNX Runtime on a CPU.

On a CPU, ONNX Runtime runs this project's U-Nets faster than eager PyTorch for the same
float32 arithmetic (BENCHMARKS.md, "Whole-body denoising on 2 cores"); the export is done once
per loaded model, in about a second. Only the MONAI core (``model.unet``) is exported: the
wrapper's padding, cropping, NSTD checks and residual stay in PyTorch, so the graph needs a
dynamic batch and size only, and the eager model stays the reference and the fallback.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from fed_ndif.errors import FedNdifError
from fed_ndif.models.networks import ConditionalDiffusionUNet, UNet25D

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")


def available_threads(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity (a container's CPU set), capped by a
    CPU quota (``docker run --cpus``, a Kubernetes CPU limit), which leaves the affinity at the
    host's count. More threads than the quota makes them wait on each other."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs granted by the cgroup's CFS quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``)."""
    try:
        if (cgroup / "cpu.max").is_file():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def choose_engine(engine: str, *, device: torch.device, precision: str) -> str:
    """``auto``: ONNX Runtime for float32 on a CPU when it is installed, else eager PyTorch."""
    if engine not in ENGINES:
        raise FedNdifError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    onnx_ok = device.type == "cpu" and precision == "fp32"
    if engine == "onnxruntime" and not onnx_ok:
        raise FedNdifError("--engine onnxruntime runs float32 on a CPU; use --device cpu "
                           "--precision fp32, or --engine torch")
    if engine == "auto":
        installed = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))
        return "onnxruntime" if onnx_ok and installed else "torch"
    return engine


class _DiffusionCore(nn.Module):
    """MONAI's diffusion U-Net with the NSTD as a positional input (export takes no kwargs)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                nstd: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, timesteps, class_labels=nstd)


class OnnxCore(nn.Module):
    """Stands in for a network's MONAI core; runs the exported graph in an ONNX Runtime session."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session
        self.names = [i.name for i in session.get_inputs()]
        self.embedded = "nstd" in self.names

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        inputs = [x.float(), timesteps, class_labels.float() if self.embedded else None]
        feed = {name: value.detach().cpu().contiguous().numpy()
                for name, value in zip(self.names, [v for v in inputs if v is not None],
                                       strict=True)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def onnx_export(model: nn.Module) -> bytes:
    """The serialized ONNX graph of ``model``'s core (inputs x, timesteps and nstd where the
    network takes them)."""
    size = 8 * model.multiple  # any multiple of the down-sampling: the axes are dynamic
    if isinstance(model, ConditionalDiffusionUNet):
        core = _DiffusionCore(model.unet)
        args = (torch.zeros(2, model.in_channels, size, size), torch.full((2,), 10))
        names = ["x", "timesteps"]
        if model.noise_embedding:
            args += (torch.full((2,), 0.1),)
            names.append("nstd")
    elif isinstance(model, UNet25D):
        core = model.unet
        args, names = (torch.zeros(2, model.in_channels, size, size),), ["x"]
    else:
        raise FedNdifError(f"no ONNX export for {type(model).__name__}")
    axes = {name: {0: "batch"} for name in names}
    axes["x"] = axes["out"] = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about shape checks it freezes; the padded input always passes them.
        warnings.simplefilter("ignore")
        torch.onnx.export(core.eval(), args, buffer, dynamo=False, opset_version=17,
                          input_names=names, output_names=["out"], dynamic_axes=axes)
    return buffer.getvalue()


def with_onnxruntime(model: nn.Module, *, threads: int) -> nn.Module:
    """A copy of ``model`` whose core runs under ONNX Runtime with ``threads`` threads."""
    import onnxruntime

    runner = copy.deepcopy(model).cpu().eval()
    graph = onnx_export(runner)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    runner.unet = OnnxCore(session)
    return runner


def inference_network(model: nn.Module, *, engine: str, threads: int) -> nn.Module:
    """``model`` as ``engine`` (already chosen by :func:`choose_engine`) runs it on ``threads``
    threads. An export that fails leaves eager PyTorch, with a warning: slower, same numbers.

    Sets PyTorch's (process-wide) thread count: ``threads`` for eager PyTorch; one beside ONNX
    Runtime, whose own pool then has the cores: PyTorch is left only the sampler's arithmetic,
    and two thread pools spinning on the same cores slow both (BENCHMARKS.md).
    """
    if engine != "torch":
        try:
            runner = with_onnxruntime(model, threads=threads)
            torch.set_num_threads(1)
            return runner
        except Exception as exc:  # any exporter or runtime failure has the fallback
            log.warning("ONNX Runtime could not take the network (%s: %s); running eager "
                        "PyTorch", exc.__class__.__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
    torch.set_num_threads(threads)
    return model
