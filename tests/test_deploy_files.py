"""The container files in deploy/: hadolint-clean; the compose file valid for Compose; the compose
demo's commands ones our CLI accepts, with each site seeing only its own data and key, read-only.

No Docker engine runs here. ``config`` needs none: Compose v2 (``docker compose``) when present,
else Debian's ``docker-compose`` 1.29, which scripts/run-tests installs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
import yaml
from flwr import __version__ as flwr_version
from packaging.requirements import Requirement

from fed_ndif.cli import build_parser
from tests.helpers.tools import require_tool

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile*"))
SITES = ("site_a", "site_b", "site_c")
NODE = "dicom-node"


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


def _compose_config(compose_file: Path, *,
                    node_allow: str | None = "SCANNER,PACS") -> subprocess.CompletedProcess:
    """``compose config`` of ``compose_file`` as if it were deploy/compose.yaml, with the DICOM
    node's allow list set as a hospital sets it (``node_allow``; None: unset)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"],
                                 capture_output=True).returncode == 0:
        command = [docker, "compose"]
    else:
        command = [require_tool("docker-compose")]
        version = subprocess.run([*command, "version", "--short"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        if version.startswith("1."):
            # Compose 1.29 predates the top-level project name; everything else it checks.
            text = re.sub(r"^name:.*\n", "", compose_file.read_text(), flags=re.MULTILINE)
            compose_file = compose_file.with_name(f"{compose_file.stem}-v1.yaml")
            compose_file.write_text(text)
    return subprocess.run([*command, "--project-directory", str(DEPLOY), "-f", str(compose_file),
                           "config"], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "NODE_ALLOW"},
                               "DOCKER_HOST": "unix:///nonexistent",
                               **({"NODE_ALLOW": node_allow} if node_allow else {})})


def test_compose_file_passes_compose_config(tmp_path):
    checked = tmp_path / "compose.yaml"
    checked.write_text((DEPLOY / "compose.yaml").read_text())
    result = _compose_config(checked)
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) >= {"coordinator", *SITES}
    assert all(resolved["services"][site]["read_only"] is True for site in SITES)
    # The same check refuses a misspelt option: it validates, it does not just parse YAML.
    broken = tmp_path / "broken.yaml"
    broken.write_text(checked.read_text().replace("  read_only: true", "  read_onyl: true"))
    assert "read_onyl" in broken.read_text()
    result = _compose_config(broken)
    assert result.returncode != 0 and "read_onyl" in result.stdout + result.stderr
    # The DICOM node is closed by default: without an allow list the file does not resolve.
    result = _compose_config(checked, node_allow=None)
    assert result.returncode != 0 and "NODE_ALLOW" in result.stdout + result.stderr


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
    assert set(services) == {"coordinator", *SITES, NODE}
    for name, service in services.items():
        dockerfile = DEPLOY / Path(service["build"]["dockerfile"]).name
        program, *subcommand = service.get("entrypoint") or _entrypoint(dockerfile)
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_pyproject_edit_still_finds_flower(dockerfile, tmp_path):
    """The images drop Flower's [simulation] extra (Ray) with sed; a silent no-op would pull Ray
    into every site image, or, if the pin moved, a Flower other than the image's."""
    edit = re.search(r"sed -i '([^']+)' pyproject\.toml", dockerfile.read_text())
    assert edit, f"{dockerfile.name} no longer edits pyproject.toml"
    copy = tmp_path / "pyproject.toml"
    copy.write_text((DEPLOY.parent / "pyproject.toml").read_text())
    subprocess.run(["sed", "-i", edit.group(1), str(copy)], check=True)
    dependencies = tomllib.loads(copy.read_text())["project"]["dependencies"]
    flower = [Requirement(d) for d in dependencies if d.startswith("flwr")]
    assert len(flower) == 1 and not flower[0].extras, flower
    assert flower[0].specifier.contains(flwr_version), flower


def test_the_dicom_node_service_keeps_its_spool_and_reads_its_checkpoint_only():
    service = _compose()["services"][NODE]
    args = build_parser().parse_args([*service["entrypoint"][1:],
                                      *map(_expand, service["command"])])
    mounts = {m.split(":")[1]: m for m in service["volumes"]}
    assert mounts[args.checkpoint].endswith(":ro")
    assert not mounts[args.spool].endswith(":ro")  # the queue must survive a restart
    assert service["read_only"] is True
    assert [p.split(":")[-1] for p in service["ports"]] == [str(args.port)]
    assert args.destination.count("@") == 1
    # Closed by default: a named allow list, never --allow-any; published on loopback unless
    # the hospital names its address.
    assert args.allow and not args.allow_any
    assert "${NODE_ALLOW:?" in service["command"][service["command"].index("--allow") + 1]
    assert [_expand(p).split(":")[0] for p in service["ports"]] == ["127.0.0.1"]
