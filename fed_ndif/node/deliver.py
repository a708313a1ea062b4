"""Sending a derived series to the destination (the PACS) with C-STORE, and when to try again.

A delivery counts only when every instance got a success (or warning) status; anything less is
retried later with the same files, whose UIDs are fixed, so a repeat replaces rather than adds.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE

log = logging.getLogger(__name__)

# Largest pause between two delivery tries while the destination is down.
MAX_BACKOFF_S = 60.0
FIRST_BACKOFF_S = 2.0
# C-STORE warnings (PS3.4 B.2.3): the instance is stored.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class DeliveryError(Exception):
    """The destination did not take the whole series (it is kept for the next try)."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def backoff_s(failures: int) -> float:
    """Pause after ``failures`` failed tries in a row: 2, 4, 8, ... s, at most 60 s."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2.0 ** max(0, failures - 1))


def send_series(files: list[Path], destination: Destination, *, calling_ae: str,
                timeout_s: float = 30.0) -> int:
    """C-STORE ``files`` to ``destination`` over one association; returns how many were sent.
    Raises :class:`DeliveryError` unless every instance was stored."""
    if not files:
        raise DeliveryError("nothing to send")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    contexts = sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
                       for h in headers})
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    tls = (destination.ssl_context, destination.host) if destination.ssl_context else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise DeliveryError(f"association {why}")
    _no_delay(assoc)
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = int(status.get("Status", -1)) if status else -1
            if code not in _STORED:
                what = f"status 0x{code:04X}" if code >= 0 else "no response"
                raise DeliveryError(f"C-STORE of {path.name}: {what}")
    finally:
        if assoc.is_established:
            assoc.release()
    return len(files)


def _no_delay(assoc: object) -> None:
    """Send each C-STORE at once: with Nagle's algorithm on, the data set after the command
    waits for the peer's delayed ACK (40 ms on Linux) at every instance."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
