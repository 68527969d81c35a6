"""Child-process supervision for ``mmq up``: a child that exits is restarted.

One worker's exit used to stop the whole local stack. Now each child (redis,
workers, Flower, the API) is restarted after an exponential backoff, doubling
from ``backoff_s`` up to ``backoff_max_s`` while it keeps failing fast, and back
to ``backoff_s`` once it had run for ``stable_s``; the other children keep
running throughout. Ctrl-C or SIGTERM stops them all (``run_supervised``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen]  # starts (and restarts) the process
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it is down, waiting out its backoff
    delay: float = 0.0  # the last backoff; doubles per fast failure
    restarts: int = 0


class Supervisor:
    def __init__(self, *, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                 stable_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] | None = None):
        self.backoff_s, self.backoff_max_s, self.stable_s = backoff_s, backoff_max_s, stable_s
        self.clock = clock
        self.log = log or (lambda msg: print(f"mmq up: {msg}", file=sys.stderr, flush=True))
        self.children: list[Child] = []
        self._lock = threading.Lock()  # add/poll/stop from the main and the poll thread
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, start: Callable[[], subprocess.Popen]) -> Child:
        """Start a child now and keep it running."""
        child = Child(name, start)
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the supervisor is stopping")
            child.proc, child.started_at = start(), self.clock()
            self.children.append(child)
        return child

    def poll(self) -> None:
        """One turn: notice exits, schedule their restarts, restart those due."""
        with self._lock:
            if self._stopping.is_set():
                return
            now = self.clock()
            for c in self.children:
                if c.restart_at is None and c.proc is not None and c.proc.poll() is not None:
                    self._schedule(c, now)
                elif c.restart_at is not None and now >= c.restart_at:
                    self._restart(c, now)

    def _next_delay(self, c: Child, ran: float) -> float:
        # A child that ran stably failed for a new reason: retry soon. One that keeps
        # dying at once (a port taken, a bad setting) is retried ever less often.
        if ran >= self.stable_s or not c.delay:
            return self.backoff_s
        return min(2 * c.delay, self.backoff_max_s)

    def _schedule(self, c: Child, now: float) -> None:
        ran = now - c.started_at
        c.delay = self._next_delay(c, ran)
        c.restart_at = now + c.delay
        self.log(f"{c.name} exited with code {c.proc.returncode} after {ran:.1f} s; "
                 f"restarting in {c.delay:g} s")

    def _restart(self, c: Child, now: float) -> None:
        c.restart_at = None
        c.restarts += 1
        try:
            c.proc, c.started_at = c.start(), now
        except OSError as e:  # could not even spawn: a fast failure
            c.delay = self._next_delay(c, 0.0)
            c.restart_at = now + c.delay
            self.log(f"{c.name} could not be started ({e}); retrying in {c.delay:g} s")
            return
        self.log(f"{c.name} restarted (pid {c.proc.pid}, restart {c.restarts})")

    def start(self, interval: float = 0.5) -> None:
        """Poll in a background thread until ``stop``."""
        def loop() -> None:
            while not self._stopping.wait(interval):
                self.poll()

        self._thread = threading.Thread(target=loop, name="mmq-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child, wait up to ``timeout`` for each, then kill."""
        with self._lock:
            self._stopping.set()
            procs = [c.proc for c in self.children if c.proc is not None]
        if self._thread is not None:
            self._thread.join()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def run_supervised(setup: Callable[[Supervisor], None], sup: Supervisor | None = None) -> int:
    """Start the children with ``setup(sup)`` and keep them running until Ctrl-C or
    SIGTERM, then stop them all. -> the exit code (0)."""
    sup = sup or Supervisor()
    # SIGTERM (timeout, systemd, docker stop) must stop the children too, not orphan
    # them: turn it into the same exit path as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sup.start()
        setup(sup)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C (or SIGTERM) while the children stop must not abandon them
        # half-way with a traceback: stopping is already under way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop()
