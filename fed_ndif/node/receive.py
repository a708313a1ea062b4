"""The receiving side of the DICOM node: a pynetdicom storage SCP that answers C-ECHO and C-STORE.

Every storage SOP class and transfer syntax pynetdicom knows is accepted (a PACS sends whole
studies: CT, PET, secondary captures, compressed or not); which series are processed is the
worker's business, not the sender's. A C-STORE is answered with success only once the instance
is parsed completely and lies durably in the spool; anything else gets a failure status, so the
sender knows to send again.
"""

from __future__ import annotations

import errno
import io
import logging
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field

import pydicom
from pydicom.encaps import generate_fragments
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from fed_ndif.data.dicom.derived import derived_reason
from fed_ndif.node.spool import Spool, is_uid

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_MATCHING_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210


@dataclass
class _Tally:
    """What one association stored, for its single log line."""

    calling: str
    stored: Counter = field(default_factory=Counter)  # series name -> instances
    refused: int = 0


class Receiver:
    """Binds the storage SCP to a spool; one instance per node."""

    def __init__(self, spool: Spool, *, ae_title: str, allow: list[str] | None = None,
                 allow_any: bool = False, ssl_context: ssl.SSLContext | None = None,
                 max_associations: int = 10) -> None:
        """``allow``: the calling AE titles accepted; any caller only with ``allow_any``."""
        if not allow and not allow_any:
            raise ValueError("name the calling AE titles to accept, or pass allow_any=True")
        self.spool = spool
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_associations = max_associations
        self.ae.require_called_aet = True
        if allow:
            self.ae.require_calling_aet = list(allow)
        self.ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ssl_context = ssl_context
        self._tallies: dict[int, _Tally] = {}
        self._lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None

    def start(self, host: str, port: int) -> None:
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ESTABLISHED, self._on_established),
                    (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed)]
        self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop listening; associations in progress get ``grace_s`` to finish, then abort (the
        sender then knows its unanswered instances were not stored)."""
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()
        deadline = threading.Event()
        waited = 0.0
        while server.active_associations and waited < grace_s:
            deadline.wait(0.1)
            waited += 0.1
        for assoc in server.active_associations:
            assoc.abort()

    # -- event handlers (pynetdicom threads) ---------------------------------------------------

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self._tallies[id(event.assoc)] = _Tally(calling=event.assoc.requestor.ae_title)

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("refused an association from %s (calling AE title %r, called %r): not "
                    "allowed", event.assoc.requestor.address, event.assoc.requestor.ae_title,
                    event.assoc.acceptor.ae_title)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is None:
            return
        how = "aborted" if event.event is evt.EVT_ABORTED else "released"
        if not tally.stored and not tally.refused:
            return
        parts = [f"{name} x{n}" for name, n in sorted(tally.stored.items())]
        refused = f"; refused {tally.refused}" if tally.refused else ""
        log.info("received from %s (association %s): %s%s", tally.calling, how,
                 ", ".join(parts) or "nothing", refused)

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        status, name = self._store(event)
        with self._lock:
            tally = self._tallies.get(id(event.assoc))
            if tally is not None:
                if status == SUCCESS:
                    tally.stored[name] += 1
                else:
                    tally.refused += 1
        return status

    def _store(self, event: evt.Event) -> tuple[int, str]:
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = pydicom.dcmread(io.BytesIO(data))
            for _ in ds.iterall():  # parse every element: a corrupt one fails here, not later
                pass
            _check_pixels(ds)
        except Exception as exc:
            log.warning("refused an instance that cannot be parsed (%s)", exc.__class__.__name__)
            return CANNOT_UNDERSTAND, ""
        request = event.request
        sop_uid, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
        series_uid, study_uid = ds.get("SeriesInstanceUID"), ds.get("StudyInstanceUID")
        if (str(sop_uid) != str(request.AffectedSOPInstanceUID)
                or str(sop_class) != str(request.AffectedSOPClassUID)):
            log.warning("refused an instance whose SOP instance/class differs from the request")
            return NOT_MATCHING_SOP_CLASS, ""
        if not all(is_uid(v) for v in (sop_uid, sop_class, series_uid, study_uid)):
            log.warning("refused an instance without valid Study/Series/SOP Instance UIDs")
            return NOT_MATCHING_SOP_CLASS, ""
        try:
            meta = self.spool.store(
                data, series_uid=str(series_uid), sop_uid=str(sop_uid), study_uid=str(study_uid),
                sop_class=str(sop_class), modality=str(ds.get("Modality", "") or "?"),
                number=str(ds.get("SeriesNumber", "") or "?"),
                derived=derived_reason(ds) or "")
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            log.error("could not spool an instance (%s): the sender was told it failed", why)
            return OUT_OF_RESOURCES, ""
        return SUCCESS, f"{meta.name} {meta.modality}"


def _check_pixels(ds: pydicom.Dataset) -> None:
    """Raise ValueError when the pixel data is cut short (pydicom reads a truncated stream
    without complaint): native data must hold every frame, encapsulated data whole fragments."""
    if "PixelData" not in ds:
        return
    syntax = ds.file_meta.TransferSyntaxUID
    data = ds.PixelData
    if syntax.is_encapsulated:
        fragments = list(generate_fragments(data))  # raises on a malformed item
        if not fragments and len(data) > 8:
            raise ValueError("encapsulated pixel data without fragments")
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    pixels = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
              * int(ds.get("SamplesPerPixel", 1) or 1) * frames)
    expected = (pixels * bits + 7) // 8
    if len(data) < expected:
        raise ValueError(f"pixel data holds {len(data)} bytes, the image needs {expected}")
