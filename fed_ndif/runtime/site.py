"""``fed-ndif site``: a site's SuperNode (TLS, its private key, its data folder as node config).

``fed-ndif site`` checks its inputs, then supervises the SuperNode (:mod:`.supervisor`):
restarted whatever its exit until SIGTERM/SIGINT. The SuperNode runs through this module's
entry point, which can shorten Flower's idle poll and start the warm ClientApp pool before
handing over to Flower's own ``flower-supernode``:

    python -m fed_ndif.runtime.site supernode [--poll-interval S] -- ARGS

The warm ClientApp pool belongs to the supervising process (:class:`WarmPool`): started once
the site is first admitted, it outlives SuperNode restarts and is removed when the site stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fed_ndif.data.manifest import MANIFEST_NAME, manifest_path
from fed_ndif.errors import FedNdifError
from fed_ndif.runtime.prefork import write_shim
from fed_ndif.runtime.processes import (
    check_port_free,
    die_with_parent,
    flower_command,
    flower_env,
)

log = logging.getLogger(__name__)

# The SuperNode asks the SuperLink for work every 3 s when idle (hard-coded in Flower 1.42);
# this module's SuperNode entry point can shorten it (see patch_supernode_polling).
SUPERNODE_POLL_S = 1.0
POOL_PREFIX = "fed-ndif-pool-"  # + the supervising site process's pid: /tmp/fed-ndif-pool-PID-XXXX


def check_private_key(path: Path) -> Path:
    """Fail early on a missing key or a public key passed in its place."""
    if not path.is_file():
        raise FedNdifError(f"site private key {path} does not exist")
    head = path.read_bytes()[:64]
    if b"PRIVATE KEY" not in head:
        raise FedNdifError(f"{path} is not a private key (pass the key file itself, not the .pub)")
    return path


def site_manifest_path(data: Path) -> Path:
    """The site's manifest, given its folder or the file itself; it must exist."""
    manifest = manifest_path(data)
    if not manifest.is_file():
        raise FedNdifError(f"no site manifest at {manifest} (a site folder holds "
                           f"{MANIFEST_NAME}; see README, 'Site manifest')")
    return manifest


def supernode_args(*, superlink: str, ca: Path, key: Path, data: Path, name: str,
                   device: str = "auto", port: int = 9094,
                   require_secure: bool = False) -> list[str]:
    """``flower-supernode`` arguments for one site (TLS, node key, the site's data only).

    ``require_secure``: the site trains only in SecAgg+ rounds (fed_ndif.client.secure)."""
    node_config = f"data-path='{data}' site-name='{name}' device='{device}'"
    if require_secure:
        node_config += " secure-aggregation='required'"
    return ["--superlink", superlink, "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(key), "--port", str(port),
            "--node-config", node_config]


def site_command(*, superlink: str, ca: Path, key: Path, data: Path, name: str | None = None,
                 device: str = "auto", port: int = 9094, poll_s: float = SUPERNODE_POLL_S,
                 require_secure: bool = False) -> tuple[list[str], dict[str, str]]:
    """Checked command line and environment that start a site's SuperNode."""
    if "://" in superlink:
        raise FedNdifError(f"--superlink {superlink!r}: give HOST:PORT, without a scheme (the "
                           "connection is always TLS)")
    if ":" not in superlink or not superlink.rpartition(":")[2].isdigit():
        raise FedNdifError(f"--superlink {superlink!r}: give HOST:PORT")
    if not ca.is_file():
        raise FedNdifError(f"CA certificate {ca} does not exist (get ca.crt from the "
                           "coordinator)")
    check_private_key(key)
    data = data.resolve()
    manifest = site_manifest_path(data)
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise FedNdifError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if "'" in str(data) or (name and "'" in name):
        raise FedNdifError("the data path and site name may not contain a quote (')")
    name = name or manifest.parent.name
    args = supernode_args(superlink=superlink, ca=ca.resolve(), key=key.resolve(),
                          data=data, name=name, device=device, port=port,
                          require_secure=require_secure)
    command = [sys.executable, "-m", "fed_ndif.runtime.site", "supernode", "--poll-interval",
               f"{poll_s:g}", "--", *args]
    return command, flower_env(None)


def run_site(**kwargs: Any) -> None:
    """Run the site's SuperNode under :class:`~.supervisor.SiteSupervisor` until SIGTERM or
    SIGINT; start-up failures (a missing file, a taken --port) end it in one line."""
    from fed_ndif.runtime.supervisor import supervise

    warm_pool = kwargs.pop("warm_pool", True)
    command, env = site_command(**kwargs)
    port = int(kwargs.get("port", 9094))
    check_port_free("127.0.0.1", port, what="the SuperNode's local ClientApp API, --port")
    clean_stale_pools()
    name = kwargs.get("name") or site_manifest_path(Path(kwargs["data"]).resolve()).parent.name
    log.info("starting the SuperNode of site %s: %s", name, " ".join(command[5:]))
    pool = WarmPool() if warm_pool else None
    try:
        supervise(command, env if pool is None else pool.environment(env),
                  superlink=kwargs["superlink"], ca=Path(kwargs["ca"]).resolve(),
                  key=Path(kwargs["key"]).resolve(), name=name, port=port,
                  on_admitted=None if pool is None else pool.start)
    finally:
        if pool is not None:
            pool.stop()


def clean_stale_pools() -> list[Path]:
    """Remove ClientApp pool folders of sites that are gone (killed before they could)."""
    import tempfile

    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{POOL_PREFIX}*"):
        pid = folder.name[len(POOL_PREFIX):].split("-")[0]
        with contextlib.suppress(OSError):
            if not pid.isdigit() or folder.stat().st_uid != os.getuid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # its site still runs
            except ProcessLookupError:
                pass
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d leftover ClientApp pool folder(s)", len(removed))
    return removed


def patch_supernode_polling(poll_s: float) -> None:
    """Make an idle SuperNode ask for work every ``poll_s`` s instead of 3 s (Flower 1.42).

    Flower 1.42 hard-codes ``time.sleep(3)`` in the SuperNode's pull loop; this swaps the
    ``time`` module seen by ``flwr.supernode.start_client_internal`` for one whose ``sleep`` is
    capped at ``poll_s``. It leans on a private module: checked by tests/test_deployment.py.
    """
    import types

    from flwr.supernode import start_client_internal as sci

    real = time

    def sleep(seconds: float) -> None:
        real.sleep(min(seconds, poll_s))

    shim = types.SimpleNamespace(**{name: getattr(real, name) for name in dir(real)
                                    if not name.startswith("__")})
    shim.sleep = sleep
    if getattr(sci, "time", None) is not real:
        raise FedNdifError("this Flower version's SuperNode cannot take --poll-interval; "
                           "leave it at 3")
    sci.time = shim  # type: ignore[assignment]


class WarmPool:
    """A site's ClientApp pool (:mod:`.prefork`) and the ``flwr-clientapp`` shim that the
    SuperNode finds first on its PATH. Until the pool runs, the shim runs Flower's own
    command, so the pool (seconds of imports) is started only once the site is admitted."""

    def __init__(self) -> None:
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix=f"{POOL_PREFIX}{os.getpid()}-"))
        self.socket = self.folder / "pool.sock"
        self.shim = write_shim(self.folder / "bin", self.socket, flower_command("flwr-clientapp"))
        self.process: subprocess.Popen | None = None

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        return {**env, "PATH": os.pathsep.join([str(self.shim.parent), env.get("PATH", "")])}

    def start(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fed_ndif.runtime.prefork", "serve", str(self.socket),
                 "--parent-pid", str(os.getpid())], preexec_fn=die_with_parent(signal.SIGTERM))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


def supernode_main(argv: Sequence[str]) -> None:
    """``python -m fed_ndif.runtime.site supernode [--poll-interval S] -- SUPERNODE-ARGS``."""
    import argparse

    parser = argparse.ArgumentParser(prog="fed_ndif.runtime.site supernode")
    parser.add_argument("--poll-interval", type=float, default=3.0)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    flower_args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)
    if ns.poll_interval < 3.0:
        patch_supernode_polling(max(0.1, ns.poll_interval))
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    if sys.argv[1:2] == ["supernode"]:
        supernode_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m fed_ndif.runtime.site supernode [--poll-interval S] -- ARGS")
