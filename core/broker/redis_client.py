"""The one way an mmq process opens the broker's Redis: a plain URL, or Sentinels.

``MMQ_BROKER_URL`` is either a Redis URL (``redis://``, ``rediss://``, ``unix://``) or
kombu's Sentinel form, one ``sentinel://`` URL per Sentinel joined by ``;``::

    sentinel://:password@h1:26379/0;sentinel://h2:26379;sentinel://h3:26379

with the name of the monitored primary in ``MMQ_SENTINEL_MASTER``. As kombu reads it,
the first URL's password (and user) and database are the primary's; the Sentinels
themselves are asked without a password. Celery's connections (kombu's
``SentinelTransport``) and mmq's own clients here (admission, the sweep, dead letters,
queue depths for metrics and ``mmq top``, the API's readiness, the workers' poison
guard) then follow the same primary.

A client from ``redis_for`` on a Sentinel URL asks the Sentinels for the primary's
address each time it opens a connection (redis-py's ``SentinelConnectionPool``), and
drops a connection on a connection error, or when the server it reaches answers as a
replica (``READONLY``, or a blocked call unblocked by a demotion), so the next
command, or redis-py's own retry of this one, goes to whichever server the Sentinels
name then. Lua scripts (admission) are sent by SHA and re-loaded on ``NOSCRIPT``, which
is what a newly promoted replica answers first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import redis
from redis.sentinel import Sentinel

from core.config import Settings, get_settings

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379


def is_sentinel(url: str) -> bool:
    return urlparse(url.split(";", 1)[0].strip()).scheme == SENTINEL_SCHEME


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``sentinel://...;sentinel://...`` broker URL, read as kombu reads it."""

    sentinels: tuple[tuple[str, int], ...]  # (host, port) of every Sentinel
    db: int = 0  # the first URL's path, as kombu's virtual host
    username: str | None = None  # the primary's credentials (the first URL's)
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl:
    parts = [urlparse(p.strip()) for p in url.split(";") if p.strip()]
    if not parts or any(p.scheme != SENTINEL_SCHEME for p in parts):
        raise ValueError(f"not a sentinel:// broker URL: {url!r}")
    first = parts[0]
    path = first.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database in {url!r} is not a number: {path!r}")
    return SentinelUrl(
        sentinels=tuple((p.hostname or "127.0.0.1", p.port or SENTINEL_PORT) for p in parts),
        db=int(path or 0),
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None)


# One Sentinel manager per set of Sentinels and socket options: the sweep opens a
# client every few seconds, and each manager holds a connection to every Sentinel.
_managers: dict[tuple, Sentinel] = {}
_managers_lock = threading.Lock()


def _manager(parsed: SentinelUrl, sentinel_kwargs: dict) -> Sentinel:
    key = (parsed.sentinels, tuple(sorted(sentinel_kwargs.items())))
    with _managers_lock:
        if key not in _managers:
            _managers[key] = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
        return _managers[key]


def redis_for(source: Settings | str | None = None, *, master_name: str | None = None,
              **kwargs) -> redis.Redis:
    """A client of the broker's Redis (the Sentinels' current primary for a
    ``sentinel://`` URL). ``source``: settings (default: the process's) or a URL;
    ``kwargs`` go to redis-py (``socket_timeout=...``)."""
    url = source if isinstance(source, str) else (source or get_settings()).broker_url
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    if master_name is None:
        master_name = (source if isinstance(source, Settings) else get_settings()).sentinel_master
    parsed = parse_sentinel_url(url)
    # The Sentinels get the same socket timeouts as the primary: one that stopped
    # answering must not hold up the discovery, which then asks the next one.
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    auth = {k: v for k, v in (("username", parsed.username), ("password", parsed.password))
            if v is not None}
    return _manager(parsed, sentinel_kwargs).master_for(
        master_name, db=parsed.db, **auth, **kwargs)


def broker_transport_options(s: Settings) -> dict:
    """kombu's transport options for the broker URL, for every Celery app mmq makes
    (workers, producers, Flower's monitor, control clients).

    The socket limits are what make a worker follow a failover when the primary's host
    is lost rather than its process (Celery #6348): a SIGKILLed primary's kernel resets
    every connection and kombu reconnects at once, through the Sentinels; a lost or cut
    off host resets nothing. kombu's default is no socket timeout, and a worker then
    waited for ever on its first synchronous call to the dead primary (tests/e2e/
    test_sentinel.py with the primary SIGSTOPped: 18 jobs done, then none for ten
    minutes while the replica had long been promoted). With a timeout each pooled
    connection to the lost primary fails once and is dropped, and the next one asks
    the Sentinels. They fail one at a time in the consumer's event loop (stack dumps:
    the events publish, the bindings refresh, the BRPOP's health-check PING, each
    waiting its full timeout), so a worker is back about four timeouts after the
    promotion: hence a short timeout. ``health_check_interval`` makes kombu (>= 5.7)
    drop a BRPOP whose reply is overdue, which no socket timeout covers in its event
    loop; keepalive lets the kernel give up on dead peers too. Not
    ``retry_on_timeout``: it would replay publishes (and kombu then stops batching them).
    These checks repair connections without failing the event loop, so nothing restarts
    the consumer: a worker whose every prefetch slot held an ack that timed out on the
    hung primary sent no BRPOP again, until workers/acks.py freed such slots.
    """
    opts: dict = {
        "visibility_timeout": s.visibility_timeout,
        "socket_timeout": s.broker_socket_timeout,
        "socket_connect_timeout": s.broker_socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": max(1, round(s.broker_socket_timeout)),
    }
    if is_sentinel(s.broker_url):
        opts["master_name"] = s.sentinel_master
    return opts
