"""The delivery thread: claims due events from the outbox, POSTs them signed, records
each attempt, and retries with exponential backoff for ``webhook_retry_for_s``.

Where it runs, and why: every API and every worker process runs one (unless
``MMQ_WEBHOOK_DELIVER=0``). Workers end most jobs, the API ends cancelled ones, and a
deployment may run either without the other (SDK producers and workers, no API), so
delivery depends on neither kind of process. The outbox is in SQL and every decision
is the database's clock (due times, claim leases, the retry window), so any number of
processes on any hosts share the work: a claim leases its rows for a while (on
PostgreSQL ``FOR UPDATE SKIP LOCKED``, so claimers never wait on each other), and the
rows of a process that dies mid-delivery come back when the lease runs out. Restarts
lose nothing: a pending row is just due. A receiver may see an event twice (a POST
that succeeded but whose record did not commit, a lease that ran out during a slow
POST); every retry carries the same ``webhook-id`` so it can de-duplicate.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from core import store
from core.config import Settings
from core.errors import brief_error, brief_traceback
from core.webhooks import signing
from core.webhooks.event import event_body
from core.webhooks.urls import blocked_address, resolve

log = logging.getLogger("mmq.webhooks")
USER_AGENT = "mmq-webhooks/1"


def backoff_s(attempt: int, settings: Settings, rnd: Callable[[], float] = random.random
              ) -> float:
    """Seconds until the try after ``attempt`` (1 = the first): base * 2^(attempt-1),
    capped, +-20 % jitter so that a receiver back from an outage is not hit by every
    retry at once."""
    delay = min(settings.webhook_retry_max_s,
                settings.webhook_retry_base_s * 2 ** min(attempt - 1, 30))
    return delay * (0.8 + 0.4 * rnd())


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address already checked, with the certificate checked for the
    URL's host name (SNI and hostname verification as usual)."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float,
         allow_private: bool) -> tuple[int | None, str | None]:
    """One POST, no redirects followed. -> (HTTP status, None), or (None, the error).
    Never raises: whatever goes wrong in this one attempt is its failed attempt, which
    the retry policy retries or ends. A URL that gets past the submit checks (or was
    stored before them) can raise more than OSError here: UnicodeError from the
    resolver's IDNA encoding, ValueError from its port, UnicodeEncodeError from
    http.client's ASCII request line. Raised, it escaped the turn: the delivery was
    never recorded, stayed pending with 0 attempts, and was claimed again every turn."""
    try:
        return _post(url, body, headers, timeout=timeout, allow_private=allow_private)
    except Exception as e:  # noqa: BLE001  (any error of one attempt: see above)
        return None, f"{type(e).__name__}: {e}"[:500]


def _post(url: str, body: bytes, headers: dict[str, str], *, timeout: float,
          allow_private: bool) -> tuple[int | None, str | None]:
    """``post``, raising what it does not know how to say better.
    The host is resolved here and the connection made to the address checked (a name
    that now resolves to a private address is refused: DNS rebinding)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as e:
        return None, f"cannot resolve {host}: {e}"
    if not allow_private:
        addresses = [a for a in addresses if not blocked_address(a)]
        if not addresses:
            return None, f"{host} resolves only to private addresses; not called"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        conn = _PinnedHTTPS(host, addresses[0], port, timeout)
    else:
        conn = http.client.HTTPConnection(addresses[0], port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={
            **headers, "host": parts.netloc, "user-agent": USER_AGENT})
        resp = conn.getresponse()
        resp.read(65536)  # the answer's body is not kept; read a bit so the close is clean
        return resp.status, None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    finally:
        conn.close()


class Deliverer:
    """The delivery loop of one process (``start`` runs it in a daemon thread)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, *,
                 write_lock: threading.Lock | None = None):
        self.sessions, self.settings = sessions, settings
        self.key = signing.secret_key(settings.webhook_secret)
        self.write_lock = write_lock  # SQLite: this process's writers queue on it
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, settings.webhook_concurrency),
                                        thread_name_prefix="mmq-webhook")
        self._thread: threading.Thread | None = None

    @contextmanager
    def _tx(self):
        with self.write_lock or nullcontext(), self.sessions.begin() as s:
            yield s

    def start(self) -> Deliverer:
        self._thread = threading.Thread(target=self._loop, name="mmq-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.run_once()
            except Exception as e:  # noqa: BLE001  (a store outage: the next turn retries)
                # The driver's message, not SQLAlchemy's (statement and parameters),
                # and at debug level a traceback cut the same way.
                log.warning("webhook delivery turn failed (%s)", brief_error(e))
                log.debug("the turn's error:\n%s", brief_traceback(e))
                n = 0
            if n < self.settings.webhook_concurrency:  # a full claim: more may be due now
                self._stop.wait(self.settings.webhook_poll_s)

    def run_once(self) -> int:
        """Claim the due deliveries (up to ``webhook_concurrency``), attempt each once,
        concurrently. -> how many were attempted."""
        # Longer than one POST can take (http.client's timeout is per socket operation:
        # connect, send, answer), so a live claim never runs out under its owner.
        lease = 3 * self.settings.webhook_timeout_s + 5
        with self._tx() as s:
            claimed = store.claim_due(session=s, limit=self.settings.webhook_concurrency,
                                      lease_s=lease)
        for f in [self._pool.submit(self.attempt, c) for c in claimed]:
            f.result()
        return len(claimed)

    def attempt(self, c: store.webhooks.Claimed) -> str | None:
        s = self.settings
        with self.sessions() as sess:
            body = event_body(sess, c.job_id, c.event)
        t0 = time.monotonic()
        if body is None:
            status, error = None, "the job no longer exists"
        else:
            # The signing time is this host's clock: it is for the receiver, which
            # refuses stale timestamps (5 min by default) against its own clock.
            ts = int(time.time())
            status, error = post(c.url, body, signing.headers(self.key, c.id, ts, body),
                                 timeout=s.webhook_timeout_s,
                                 allow_private=s.webhook_allow_private)
        ms = (time.monotonic() - t0) * 1000
        try:
            with self._tx() as sess:
                new = store.record_attempt(
                    session=sess, claimed=c, status_code=status, error=error, duration_ms=ms,
                    retry_in_s=backoff_s(c.attempts + 1, s),
                    retry_for_s=s.webhook_retry_for_s)
        except Exception as e:  # noqa: BLE001  (its lease runs out; it is tried again)
            log.warning("could not record webhook attempt %s #%d: %s", c.id, c.attempts + 1,
                        brief_error(e))
            log.debug("the record's error:\n%s", brief_traceback(e))
            return None
        if new != store.webhooks.DELIVERED:
            log.info("webhook %s to %s: attempt %d failed (%s)%s", c.id, c.url,
                     c.attempts + 1, error, "; giving up" if new == "failed" else "")
        return new


def start_delivery(sessions: sessionmaker[Session], settings: Settings, *,
                   write_lock: threading.Lock | None = None) -> Deliverer | None:
    """Start this process's delivery thread, unless delivery is off here
    (``MMQ_WEBHOOK_DELIVER=0``) or no secret is set (then nothing can be signed)."""
    if not settings.webhook_deliver or not settings.webhook_secret:
        return None
    return Deliverer(sessions, settings, write_lock=write_lock).start()
