"""A site's SuperNode, kept running: ``fed-ndif site`` is a service, not a one-shot process.

Flower's SuperNode ends on its own in ordinary situations: exit 0 when a restarted SuperLink
no longer knows it (HTTP 401), exit 1 when its key is refused or the TLS handshake fails. The
supervisor restarts it whatever the exit, with capped backoff, until SIGTERM or SIGINT. It says
why in one line (:mod:`.reach` finds the cause), at most once a minute per cause, and swallows
Flower's repeated "Connection attempt failed" lines. Before each start it releases the
connection a crashed predecessor left open, so a site restarted at once is admitted at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fed_ndif.runtime.processes import Throttle, die_with_parent, stop_process
from fed_ndif.runtime.reach import diagnose, release_node, remember_node, remembered_node
from fed_ndif.server.federation import REPLY_POLL_S

log = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
EXIT_GRACE_S = 10.0  # after the SuperNode exits, for its helpers to end and flush
RELEASE_SETTLE_S = 3 * REPLY_POLL_S  # after a release, before the node is admitted again
NODE_ID = re.compile(rb"SuperNode ID: (\d+)")
TRACEBACK = ("Traceback (most recent call last):", "Exception in thread")
LOG_LINE = re.compile(r"^(\x1b\[\d+m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b|^\d\d:\d\d:\d\d")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
# Flower's heartbeat thread dies with a traceback when a restarted SuperLink answers 401; the
# supervisor says what happened in one line instead.
EXPECTED_TRACEBACK = ("401 Unauthorized",)
HTTPX_HINT = "For more information check: https://developer.mozilla.org"
UNEXPECTED = "the SuperNode exited with code"


@dataclass
class Backoff:
    """Delays that double from ``first_s`` up to ``max_s``; reset once a connection worked."""

    first_s: float = FIRST_DELAY_S
    max_s: float = MAX_DELAY_S
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.first_s

    def __call__(self) -> float:
        delay, self.next_s = self.next_s, min(self.next_s * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.next_s = self.first_s


@dataclass
class Attempt:
    """What one SuperNode process said before it ended."""

    released: str | None = None  # release_node's answer before the start, if it was asked
    node_id: int | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    exiting: bool = False  # inside Flower's multi-line exit message
    held: list[str] | None = None  # a traceback, until its exception line says what it is
    # Until the site is admitted, the SuperNode's start-up lines: shown once it is, dropped if
    # it ends first for a reason the supervisor names (else a refused key would repeat a
    # screenful of Flower's start-up lines at every try).
    pending: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))

    def emit(self, *lines: str) -> None:
        if self.node_id is None:
            self.pending.extend(lines)
        else:
            _emit(*lines)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.tail)


class SiteSupervisor:
    """Runs ``command`` (the SuperNode) until stopped; see the module docstring."""

    def __init__(self, command: list[str], env: dict[str, str], *, superlink: str, ca: Path,
                 key: Path, name: str, port: int,
                 on_admitted: Callable[[], None] | None = None):
        self.command, self.env = command, env
        self.superlink, self.ca, self.key, self.name, self.port = superlink, ca, key, name, port
        self.on_admitted = on_admitted  # called each time the coordinator admits the site
        self.backoff, self.throttle = Backoff(), Throttle()
        # A plain flag, not a threading.Event: the signal handler runs on the thread that may
        # be inside Event.wait, and Event.set would take the lock that thread holds.
        self.stopping = False
        self.child: subprocess.Popen | None = None

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGTERM)

    def run(self) -> None:
        """Start, watch and restart the SuperNode until SIGTERM or SIGINT."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM,
                                                                       signal.SIGINT)}
        try:
            while not self.stopping:
                problem = diagnose(self.superlink, self.ca)
                if problem is not None:
                    self._wait(problem)
                    continue
                attempt = Attempt(released=self._release())
                self._run_once(attempt)
                if not self.stopping:
                    why = self._why(attempt)
                    if why.startswith(UNEXPECTED):
                        _emit(*attempt.pending)  # what the supervisor cannot summarize
                    self._wait(why)
        finally:
            if self.child is not None:
                stop_process(self.child, timeout_s=20)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("site %s stopped", self.name)

    def _wait(self, reason: str) -> None:
        delay = self.backoff()
        if self.throttle(reason):
            log.warning("site %s: %s; retrying in %.0f s", self.name, reason, delay)
        self._pause(delay)

    def _release(self) -> str | None:
        """Release the connection this site's last SuperNode may have left open."""
        node_id = remembered_node(self.superlink, self.key)
        if node_id is None:
            return None
        try:
            answer = release_node(self.superlink, self.ca, self.key, node_id)
        except Exception as exc:  # a failed release only costs a wait
            log.debug("releasing node %d failed: %s", node_id, exc)
            return None
        if answer == "released":
            log.info("site %s: released the connection its previous SuperNode (node %d) left "
                     "open at the coordinator", self.name, node_id)
            # The new SuperNode is admitted under the same node id. Started at once, it could
            # be online again before the coordinator's next pull for replies, which then never
            # sees the old node offline and waits the whole round timeout for a reply the dead
            # SuperNode owed. A few pull intervals let the SuperLink fail that task first.
            self._pause(RELEASE_SETTLE_S)
        return answer

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))

    def _run_once(self, attempt: Attempt) -> None:
        self.child = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=die_with_parent(signal.SIGTERM))
        # Flower's SuperExec shares the SuperNode's output pipe and exits only once its parent is
        # gone, which a zombie is not: so the pipe is read on a thread and the SuperNode reaped
        # here, without waiting for end-of-file. Lines are handled on this (the main) thread,
        # which starts the warm pool: a parent-death signal follows the thread that forked.
        lines: queue.Queue[bytes | None] = queue.Queue()

        def pump(stream) -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, args=(self.child.stdout,), daemon=True).start()
        ended: float | None = None
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = b""
            if line is None:
                break
            if line:
                self._line(line, attempt)
            if ended is None and self.child.poll() is not None:
                ended = time.monotonic()
            elif ended is not None and time.monotonic() - ended > EXIT_GRACE_S:
                with contextlib.suppress(ProcessLookupError):  # its helpers, still writing
                    os.killpg(self.child.pid, signal.SIGKILL)
                if time.monotonic() - ended > 2 * EXIT_GRACE_S:
                    break  # a process outside its group holds the pipe: stop reading it
        self.child.wait()
        attempt.tail.append(f"exit code {self.child.returncode}")
        if attempt.held:
            attempt.emit(*attempt.held)

    def _line(self, line: bytes, attempt: Attempt) -> None:
        text = line.decode(errors="replace").rstrip()
        attempt.tail.append(text)
        if match := NODE_ID.search(line):
            attempt.node_id = int(match.group(1))
            _emit(*attempt.pending)
            attempt.pending.clear()
            remember_node(self.superlink, self.key, attempt.node_id)
            self.backoff.reset()
            if self.on_admitted is not None:
                self.on_admitted()
        if "Exit Code:" in text:
            attempt.exiting = True  # Flower's exit message: summarized by _why
        if attempt.exiting or "SSL/TLS handshake error" in text:
            return
        if "Connection attempt failed" in text:
            if self.throttle("connection lost"):
                reason = diagnose(self.superlink, self.ca) or "the coordinator answered again"
                log.warning("site %s: lost the coordinator: %s; the SuperNode keeps retrying",
                            self.name, reason)
            return
        if attempt.held is not None and not LOG_LINE.match(text):
            attempt.held.append(text)
            if EXCEPTION_LINE.match(text):
                held, attempt.held = attempt.held, None
                if not any(expected in text for expected in EXPECTED_TRACEBACK):
                    attempt.emit(*held)
            elif len(attempt.held) > 200:
                attempt.emit(*attempt.held)
                attempt.held = None
            return
        if text.startswith(TRACEBACK):
            attempt.held = [text]
        elif not text.startswith(HTTPX_HINT):
            attempt.emit(text)

    def _why(self, attempt: Attempt) -> str:
        """One line saying why the SuperNode ended."""
        code = self.child.returncode if self.child is not None else None
        if attempt.saw("Failed to activate SuperNode"):
            if attempt.released in ("released", "offline"):
                return ("the coordinator still holds this site's previous connection (another "
                        "SuperNode with this key is connected?)")
            unregistered = (f"the coordinator refused this site's key {self.key}: it is not "
                            f"registered there (the coordinator registers {self.key.name}.pub "
                            "with --register)")
            if attempt.released is None:  # nothing known of an earlier connection here
                return (f"{unregistered}, or it still holds a connection of this site from "
                        "before a crash (let go within about a minute)")
            return unregistered
        if attempt.saw("address already in use") or attempt.saw("API failed to start"):
            return (f"the SuperNode's local port {self.port} (--port) is taken by another "
                    "process")
        if attempt.node_id is not None and (code == 0 or attempt.saw("terminated gracefully")):
            return ("the coordinator ended this site's connection (it restarted or the run "
                    "stopped); reconnecting")
        if problem := diagnose(self.superlink, self.ca):
            return problem
        last = next((line for line in reversed(attempt.tail) if line.strip()
                     and not line.startswith("exit code")), "")
        return f"{UNEXPECTED} {code} ({last.strip()[:160]})"


def _emit(*lines: str) -> None:
    """Pass the SuperNode's own lines on, as they were."""
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def supervise(command: list[str], env: dict[str, str], **kwargs) -> None:
    """Run a :class:`SiteSupervisor` until SIGTERM or SIGINT."""
    SiteSupervisor(command, env, **kwargs).run()

