"""Why a site cannot reach its coordinator, in one line, and releasing its old connection.

Flower's SuperNode says only "Connection attempt failed" whatever the cause. :func:`diagnose`
repeats the steps of a connection one at a time (name, TCP, TLS with the federation's CA) and
names the first that fails. :func:`release_node` ends the connection a crashed SuperNode left
open at the SuperLink: Flower refuses to activate a node it still counts online (until its
heartbeats are missed, about a minute) with the same message as an unregistered key.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _speaks_plain_http(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def diagnose(address: str, ca: Path, *, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """One line saying why ``address`` cannot be reached over TLS trusting ``ca``; None when
    a TLS handshake with it succeeds."""
    host, port = split_address(address)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve the coordinator's name {host!r} ({exc.strerror})"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return (f"nothing listens at {address} (connection refused): the coordinator is not "
                "running, or the address is wrong")
    except TimeoutError:
        return f"no answer from {address} within {timeout_s:.0f} s (firewall or wrong address)"
    except OSError as exc:
        return f"cannot connect to {address}: {exc.strerror or exc}"
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with context.wrap_socket(sock, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in (exc.verify_message or "") or "match" in str(exc):
            return (f"TLS handshake with {address} failed: its certificate is not valid for "
                    f"{host!r} (use the name the coordinator's certificate was made for)")
        return (f"TLS handshake with {address} failed: its certificate is not signed by {ca} "
                f"(wrong CA file?; {exc.verify_message})")
    except (ssl.SSLError, ConnectionResetError, TimeoutError) as exc:
        if _speaks_plain_http(host, port, timeout_s):
            return (f"{address} speaks plain HTTP, not TLS (a coordinator started without TLS, "
                    "or the wrong port)")
        return f"TLS handshake with {address} failed: {getattr(exc, 'reason', None) or exc}"
    except OSError as exc:
        return f"TLS handshake with {address} failed: {exc.strerror or exc}"
    finally:
        sock.close()


def node_file(address: str, key: Path) -> Path:
    """Where a site remembers its node id at ``address`` (survives a crash of the site)."""
    digest = hashlib.sha256(f"{address}\0{key.resolve()}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fed-ndif-node-{digest}"


def remember_node(address: str, key: Path, node_id: int) -> None:
    path = node_file(address, key)
    partial = path.with_suffix(".partial")
    partial.write_text(str(node_id))
    partial.replace(path)


def remembered_node(address: str, key: Path) -> int | None:
    try:
        return int(node_file(address, key).read_text().strip())
    except (OSError, ValueError):
        return None


def release_node(address: str, ca: Path, key: Path, node_id: int) -> str:
    """Deactivate node ``node_id`` at the SuperLink, signed with the site's key.

    Returns "released" (it was online: a crashed SuperNode's), "offline" (nothing to do) or
    "unknown" (this SuperLink does not know that id with this key, e.g. it restarted). Leans on
    Flower 1.42's Fleet HTTP client and node-auth interceptor: kept to this one function.
    """
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    private = load_ssh_private_key(key.read_bytes(), None)
    interceptor = NodeAuthHttpInterceptor(private, private.public_key())  # type: ignore[arg-type]
    with FleetHttpClient.from_server_address(address, False, str(ca),
                                             interceptors=[interceptor]) as client:
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == httpx.codes.UNAUTHORIZED:
                return "unknown"
            if exc.response.status_code == httpx.codes.PRECONDITION_FAILED:
                return "offline"
            raise
    return "released"
