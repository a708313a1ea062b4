"""The DICOM node: receive studies, denoise each settled PET series, deliver the derived series.

One worker loop does the steps one at a time (take a settled series, denoise it, deliver an
outbox entry, drop a settled non-PET series) while pynetdicom's threads receive. Each step
leaves the spool in a state a restart can continue from (see :mod:`fed_ndif.node.spool`), so
SIGTERM lets the current step finish and then stops, and ``kill -9`` loses nothing that was
acknowledged.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fed_ndif.data.dicom.series import PET_IMAGE_STORAGE
from fed_ndif.data.prepare.privacy import scrub
from fed_ndif.errors import FedNdifError
from fed_ndif.inference import DENOISED_SERIES, LoadedModel, denoise_study, load_model
from fed_ndif.node.config import NodeConfig, check_config, parse_destination, tls_contexts
from fed_ndif.node.deliver import DeliveryError, Destination, backoff_s, send_series
from fed_ndif.node.receive import Receiver
from fed_ndif.node.spool import INCOMING, OUTBOX, WORK, SeriesMeta, Spool
from fed_ndif.runtime.processes import check_port_free

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2
# Pause of the denoising steps after a disk error (a full spool), while receiving goes on.
WORK_PAUSE_S = 60.0


@dataclass
class _Retry:
    failures: int = 0
    next_try: float = 0.0  # monotonic


@dataclass
class Node:
    """A configured node; :meth:`serve` runs it until :meth:`stop` (or SIGTERM / SIGINT)."""

    config: NodeConfig
    model: LoadedModel
    destination: Destination
    spool: Spool
    receiver: Receiver
    stopping: threading.Event = field(default_factory=threading.Event)
    retries: dict[str, _Retry] = field(default_factory=dict)
    work_paused_until: float = 0.0  # monotonic; after a disk error while denoising

    def stop(self, *_: object) -> None:
        """Ask the node to stop once the current step is done (signal-handler safe)."""
        self.stopping.set()

    def serve(self) -> None:
        try:
            self.receiver.start(self.config.host, self.config.port)
        except OSError as exc:
            raise FedNdifError(f"--port {self.config.port}: cannot listen on {self.config.host} "
                               f"({exc.strerror or exc})") from None
        callers = (" ".join(self.config.allow) if self.config.allow else
                   "ANY calling AE title (--allow-any: whoever reaches this address can send "
                   "patient data; name the senders with --allow)")
        log.log(logging.WARNING if self.config.allow_any else logging.INFO,
                "listening as %s on %s:%d%s; callers %s; destination %s; spool %s; settle %g s;"
                " model on %s, %s", self.config.ae_title, self.config.host, self.config.port,
                " (TLS)" if self.receiver.ssl_context else "", callers, self.destination,
                self.config.spool, self.config.settle_s, self.model.device, self.model.engine)
        try:
            while not self.stopping.is_set():
                try:
                    busy = self.step()
                except Exception:  # e.g. the spool's disk: keep serving, try again shortly
                    log.exception("error in the worker loop; trying again in 1 s")
                    self.stopping.wait(1.0)
                    continue
                if not busy:
                    self.stopping.wait(IDLE_POLL_S)
        finally:
            self.receiver.stop()
            log.info("stopped; pending work stays in %s for the next start", self.config.spool)

    def step(self) -> bool:
        """Do one unit of work; False when there was nothing to do. Deliveries that are due go
        first, so a busy day of new studies never holds back finished ones."""
        now = time.monotonic()
        for key in self.spool.keys(OUTBOX):
            retry = self.retries.setdefault(key, _Retry())
            if retry.next_try <= now:
                self._deliver(key, retry)
                return True
        work = self.spool.keys(WORK)  # taken before a crash, or just now
        if work and now >= self.work_paused_until:
            self._denoise(work[0])
            return True
        for meta, study_settled in self.spool.settled(self.config.settle_s):
            if meta.sop_class == PET_IMAGE_STORAGE and meta.modality.upper() == "PT":
                if meta.derived:  # our own output sent back, or another program's
                    count = len(self.spool.instances(INCOMING, meta.key))
                    self.spool.drop(meta.key)
                    log.info("dropped: %s (PET, %d instances): %s; only acquisitions are "
                             "denoised", meta.name, count, meta.derived)
                    return True
                if not self.spool.instances(INCOMING, meta.key):
                    self.spool.drop(meta.key)
                    continue
                if self.spool.take(meta.key):
                    log.info("ready: %s (%d instances, no new one for %g s)", meta.name,
                             len(self.spool.instances(WORK, meta.key)), self.config.settle_s)
                    return True
            elif study_settled:
                count = len(self.spool.instances(INCOMING, meta.key))
                self.spool.drop(meta.key)
                log.info("dropped: %s (%s, %d instances; only PET series are denoised)",
                         meta.name, meta.modality, count)
                return True
        return False

    def _denoise(self, key: str) -> None:
        meta = self.spool.meta(WORK, key) or SeriesMeta(key, "", "", "?", "?")
        started = time.perf_counter()
        try:
            result = denoise_study(self.spool.folder(WORK, key), self.spool.folder(OUTBOX, key),
                                   model=self.model, output_format="dicom", seed=self.config.seed,
                                   overwrite=True, progress=False)
        except OSError as exc:  # the spool's disk (full?): not the series' fault, try later
            self.work_paused_until = time.monotonic() + WORK_PAUSE_S
            log.error("retry: %s could not be denoised (%s); trying again in %.0f s", meta.name,
                      exc.strerror or exc, WORK_PAUSE_S)
            return
        except FedNdifError as exc:
            self._fail(key, meta, str(exc))
            return
        except Exception as exc:  # a bug must not stop the node; the series is kept
            log.debug("unexpected error while denoising %s", meta.name, exc_info=True)
            self._fail(key, meta, f"unexpected error {exc.__class__.__name__}: {exc}")
            return
        late = len(self.spool.instances(INCOMING, key))
        if late:  # the series was not complete: its derived series would not be either
            self.spool.remove_derived(key)
            self.spool.requeue(key)
            log.warning("more instances: %s got %d while being denoised; denoising it again "
                        "once it settles (a longer --settle-seconds avoids this)", meta.name,
                        late)
            return
        self.spool.finish_work(key)
        log.info("denoised: %s in %.1f s (%.1f s sampling, liver NSTD %.4f)", meta.name,
                 time.perf_counter() - started, result.sampling_seconds, result.nstd)

    def _fail(self, key: str, meta: SeriesMeta, detail: str, state: str = WORK) -> None:
        """Move the series to failed/ with its reason: the log line and reason.txt's reason
        carry no path, UID or date; reason.txt (which stays in the spool) also the detail."""
        reason = scrub(detail, roots=[self.spool.folder(state, key), self.spool.root,
                                      self.spool.root.resolve()], root_name="<series>")
        self.spool.fail(key, reason, state, detail=detail)
        log.error("failed: %s: %s (kept in failed/%s with reason.txt)", meta.name, reason, key)

    def _deliver(self, key: str, retry: _Retry) -> None:
        files = sorted((self.spool.folder(OUTBOX, key) / DENOISED_SERIES).glob("*.dcm"))
        started = time.perf_counter()
        try:
            sent = send_series(files, self.destination, calling_ae=self.config.ae_title)
        except (DeliveryError, OSError) as exc:
            retry.failures += 1
            pause = backoff_s(retry.failures)
            retry.next_try = time.monotonic() + pause
            log.warning("retry: derived series [%s] to %s in %.0f s (try %d failed: %s)",
                        key[:8], self.destination, pause, retry.failures, exc)
            return
        except Exception as exc:  # unreadable outbox files: never retried in a loop
            log.debug("derived series [%s] cannot be sent", key[:8], exc_info=True)
            self._fail(key, SeriesMeta(key, "", "", "", "?"),
                       f"the derived series cannot be sent: {exc.__class__.__name__}: {exc}",
                       OUTBOX)
            self.retries.pop(key, None)
            return
        self.spool.remove_derived(key)
        self.retries.pop(key, None)
        log.info("delivered: derived series [%s], %d instances to %s in %.1f s", key[:8], sent,
                 self.destination, time.perf_counter() - started)


def build_node(config: NodeConfig) -> Node:
    """Check the settings, load the checkpoint and recover the spool; raises FedNdifError."""
    check_config(config)
    server_tls, client_tls = tls_contexts(config)
    destination = parse_destination(config.destination, client_tls)
    # A taken port fails in one line before the checkpoint is read, hashed and loaded.
    check_port_free(config.host, config.port, what=f"--port {config.port}")
    model = load_model(config.checkpoint, steps=config.steps, samples=config.samples,
                       sampler_name=config.sampler, device=config.device,
                       precision=config.precision, batch_size=config.batch_size,
                       engine=config.engine, threads=config.threads)
    spool = Spool(Path(config.spool))
    try:
        spool.prepare()
    except OSError as exc:
        raise FedNdifError(f"--spool {config.spool}: cannot use it ({exc.strerror or exc})"
                           ) from None
    pending = {state: len(spool.keys(state)) for state in (INCOMING, WORK, OUTBOX)}
    if any(pending.values()):
        log.info("resuming: %d series settling, %d to denoise, %d to deliver",
                 pending[INCOMING], pending[WORK], pending[OUTBOX])
    receiver = Receiver(spool, ae_title=config.ae_title, allow=config.allow,
                        allow_any=config.allow_any, ssl_context=server_tls)
    return Node(config=config, model=model, destination=destination, spool=spool,
                receiver=receiver)


def run_node(config: NodeConfig) -> None:
    """``fed-ndif serve``: run until SIGTERM or SIGINT, then stop cleanly."""
    # pynetdicom logs whole data sets (patient names included) at debug level, and pydicom's
    # validation warnings quote the values they find malformed (a date, a name): keep both
    # quiet; the node's own lines say what went wrong.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    node = build_node(config)
    previous = {sig: signal.signal(sig, node.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
