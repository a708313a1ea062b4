"""Composing the hydra config tree (configs/, installed as fed_ndif.configs) from commands."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fed_ndif.errors import FedNdifError

CONFIG_MODULE = "fed_ndif.configs"


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with ``key=value`` overrides (bad ones are user errors)."""
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        message = str(exc).strip().splitlines()[0]
        raise FedNdifError(f"configuration error: {message}") from exc
    return cfg
