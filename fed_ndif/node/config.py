"""The DICOM node's settings, checked before it listens: a misconfigured node must fail at start
with one clear line, not when the first study arrives at night."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from fed_ndif.errors import FedNdifError
from fed_ndif.node.deliver import Destination

DEFAULT_SETTLE_S = 10.0
# Loopback unless the hospital names the interface: a node that takes patient data listens on
# the hospital network only when someone decided it should.
DEFAULT_HOST = "127.0.0.1"
# AE titles: 1-16 characters of the default repertoire, no backslash or control characters.
_AE_TITLE = re.compile(r"^[ -\[\]-~]{1,16}$")


@dataclass
class NodeConfig:
    checkpoint: Path
    ae_title: str
    port: int
    destination: str  # AET@HOST:PORT
    spool: Path
    host: str = DEFAULT_HOST
    settle_s: float = DEFAULT_SETTLE_S
    allow: list[str] = field(default_factory=list)
    allow_any: bool = False  # accept any calling AE title: only when asked for by name
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    destination_tls: bool = False
    # Denoising options, as `fed-ndif denoise` takes them.
    steps: int | None = None
    samples: int | None = None
    sampler: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int | None = None
    engine: str = "auto"
    threads: int | None = None
    seed: int = 0


def check_ae_title(title: str, what: str) -> str:
    if not _AE_TITLE.match(title) or not title.strip():
        raise FedNdifError(f"{what} {title!r}: an AE title is 1 to 16 printable characters "
                           "(no backslash)")
    return title.strip()


def _check_port(port: int, what: str) -> int:
    if not 1 <= port <= 65535:
        raise FedNdifError(f"{what} {port}: a port is 1 to 65535")
    return port


def parse_destination(text: str, ssl_context: ssl.SSLContext | None = None) -> Destination:
    """``AET@HOST:PORT`` -> :class:`Destination`."""
    aet, at, rest = text.rpartition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not host or not port.isdigit():
        raise FedNdifError(f"--destination {text!r}: expected AET@HOST:PORT, e.g. "
                           "PACS@10.0.0.5:104")
    return Destination(ae_title=check_ae_title(aet, "--destination AE title"), host=host,
                       port=_check_port(int(port), "--destination port"),
                       ssl_context=ssl_context)


def _file(path: Path | None, option: str) -> Path | None:
    if path is not None and not Path(path).is_file():
        raise FedNdifError(f"{option} {path}: no such file")
    return Path(path) if path is not None else None


def tls_contexts(config: NodeConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server context for incoming associations, client context for the destination).

    With --tls-cert/--tls-key the node speaks DICOM over TLS; with --tls-ca it also demands a
    certificate signed by that CA from every caller (mutual TLS) and checks the destination's
    against it.
    """
    cert = _file(config.tls_cert, "--tls-cert")
    key = _file(config.tls_key, "--tls-key")
    ca = _file(config.tls_ca, "--tls-ca")
    if (cert is None) != (key is None):
        raise FedNdifError("--tls-cert and --tls-key go together")
    if cert is None and ca is not None:
        raise FedNdifError("--tls-ca needs --tls-cert and --tls-key (TLS for incoming "
                           "associations)")
    if config.destination_tls and ca is None:
        raise FedNdifError("--destination-tls needs --tls-ca to check the destination's "
                           "certificate")
    server = client = None
    try:
        if cert is not None:
            server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server.load_cert_chain(cert, key)
            if ca is not None:
                server.load_verify_locations(cafile=ca)
                server.verify_mode = ssl.CERT_REQUIRED
        if config.destination_tls:
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            if cert is not None:
                client.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise FedNdifError(f"TLS files {cert}, {key}, {ca}: cannot be used ({exc})") from None
    return server, client


def check_config(config: NodeConfig) -> None:
    """Everything about the settings that can be checked without the checkpoint or network."""
    check_ae_title(config.ae_title, "--ae-title")
    _check_port(config.port, "--port")
    for title in config.allow:
        check_ae_title(title, "--allow")
    if config.allow and config.allow_any:
        raise FedNdifError("--allow and --allow-any exclude each other: name the senders, or "
                           "accept any")
    if not config.allow and not config.allow_any:
        raise FedNdifError("no sender is allowed: name the calling AE titles that may send "
                           "studies with --allow AET ... (the scanner's, the PACS's), or pass "
                           "--allow-any to accept any caller")
    if not config.host.strip():
        raise FedNdifError("--host is empty: give the address of the interface to listen on")
    if not config.settle_s > 0:
        raise FedNdifError(f"--settle-seconds {config.settle_s}: must be more than 0")
    spool = Path(config.spool)
    if spool.exists() and not spool.is_dir():
        raise FedNdifError(f"--spool {spool}: a file, not a folder")
    ancestor = spool
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FedNdifError(f"--spool {spool}: {ancestor} is not writable")
