"""The container files in deploy/: hadolint-clean, and the compose demo's commands are ones our
CLI accepts, with each site seeing only its own data and key, read-only.

No Docker engine (nor the compose plugin) runs here, so the compose file is checked by parsing
each service's command with the real argument parser instead of ``docker compose config``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from flwr import __version__ as flwr_version

from fed_ndif.cli import build_parser
from tests.helpers.tools import require_tool

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile*"))
SITES = ("site_a", "site_b", "site_c")


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _entrypoint(dockerfile: Path) -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile.name} has no exec-form ENTRYPOINT"
    return json.loads(match.group(1))


def _expand(arg: str) -> str:
    """Compose's ``${VAR:-default}`` with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", arg)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = require_tool("hadolint")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_flowers_own_at_our_version_and_run_unprivileged(dockerfile):
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    major_minor = ".".join(flwr_version.split(".")[:2])
    assert bases and all(re.fullmatch(rf"flwr/(superlink|supernode):{major_minor}\.\d+", b)
                         for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def test_every_compose_command_parses_with_the_cli():
    services = _compose()["services"]
    assert set(services) == {"coordinator", *SITES}
    for name, service in services.items():
        dockerfile = DEPLOY / Path(service["build"]["dockerfile"]).name
        program, *subcommand = _entrypoint(dockerfile)
        assert program == "fed-ndif"
        args = build_parser().parse_args([*subcommand, *map(_expand, service["command"])])
        assert args.func.__name__ == f"_{subcommand[0]}", name


def test_each_site_sees_only_its_own_data_and_key_read_only():
    services = _compose()["services"]
    for site in SITES:
        service = services[site]
        assert service["read_only"] is True
        mounts = {m.split(":")[1]: m for m in service["volumes"]}
        assert mounts["/data"] == f"./data/{site}:/data:ro"
        assert mounts["/certs/site.key"] == f"../certs/nodes/{site}:/certs/site.key:ro"
        assert all(m.endswith(":ro") for m in service["volumes"])
        args = build_parser().parse_args(["site", *service["command"]])
        assert (args.name, args.data, args.key) == (site, "/data", "/certs/site.key")
    coordinator = build_parser().parse_args(
        ["coordinator", *map(_expand, services["coordinator"]["command"])])
    assert sorted(Path(k).stem for k in coordinator.register) == list(SITES)
