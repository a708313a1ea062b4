"""fed-ndif: federated noise-embedded 2.5D diffusion models for low-count PET denoising."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fed-ndif")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
