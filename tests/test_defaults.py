"""One source for every default: configs/. A default written in code must equal the config's."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fed_ndif.config import load_config
from fed_ndif.data.normalization import Normalization
from fed_ndif.models.diffusion import DiffusionConfig
from fed_ndif.models.sampling import SamplerConfig

PACKAGE = Path(__file__).resolve().parents[1] / "fed_ndif"
# Code dataclasses built from a config section, and the section.
SECTIONS = [(SamplerConfig, "diffusion.sampler"), (DiffusionConfig, "diffusion"),
            (Normalization, "data.normalization")]


def _leaves(node, out: dict[str, list]) -> dict[str, list]:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict):
                _leaves(value, out)
            else:
                out.setdefault(str(key), []).append(value)
    return out


def _shipped() -> dict[str, list]:
    """Every leaf value of the top-level configs, by key name."""
    leaves: dict[str, list] = {}
    for name in ("train_local", "federated", "simulate"):
        _leaves(OmegaConf.to_container(load_config(name, []), resolve=True), leaves)
    return leaves


@pytest.mark.parametrize("cls, section", SECTIONS, ids=[s for _, s in SECTIONS])
def test_dataclass_defaults_equal_the_config(cls, section):
    cfg = OmegaConf.to_container(load_config("federated", []), resolve=True)
    for key in section.split("."):
        cfg = cfg[key]
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            assert field.name in cfg, f"{cls.__name__}.{field.name} has no {section} entry"
            assert field.default == cfg[field.name], (
                f"{cls.__name__}.{field.name} defaults to {field.default!r} in code, "
                f"{cfg[field.name]!r} in configs ({section})")


def _get_defaults():
    """``X.get("key", <constant>)`` calls in the package: (file, line, key, constant)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and isinstance(node.args[1], ast.Constant)):
                yield path.relative_to(PACKAGE.parent), node.lineno, node.args[0].value, \
                    node.args[1].value


# Reads of checkpoints written before an option existed: the value is what those checkpoints
# were trained with, not a default for new runs.
BACKWARD = {("fed_ndif/models/networks.py", "residual"):
            "diffusion checkpoints from before model.residual predicted x0 without it"}


def test_no_code_default_disagrees_with_a_config_default():
    leaves = _shipped()
    disagree = [f"{path}:{line}: {key} defaults to {value!r}; configs say {leaves[key]}"
                for path, line, key, value in _get_defaults()
                if key in leaves and value not in leaves[key]
                and (str(path), key) not in BACKWARD]
    assert not disagree, "\n".join(disagree)


def test_the_scan_sees_a_disagreeing_default(tmp_path, monkeypatch):
    # The check above must be able to fail: a planted default that no config has is found.
    planted = PACKAGE / "_planted_default_probe.py"
    planted.write_text('def f(train):\n    return train.get("batch_size", 12345)\n')
    try:
        found = [(key, value) for _, _, key, value in _get_defaults()]
    finally:
        planted.unlink()
    assert ("batch_size", 12345) in found and 12345 not in _shipped()["batch_size"]
