"""The producers' kombu Redis transport: a queue's length counts jobs, not messages.

A ``run_jobs`` message carries several jobs (core/broker/sender.py), but everything
that sizes a queue reads its Redis list's length: admission's limit
(``MMQ_MAX_QUEUE_DEPTH``, core/broker/admission.py), ``queue_depths`` (``mmq top``,
the API's ``mmq_queue_depth``), Flower's broker page. So each such message is pushed
with one ``FILLER`` entry per job beyond the first, in the same pipeline, right behind
it: the list's length is its jobs. Workers drop fillers as they fetch them
(workers/poison.py), so a message's fillers leave the list just after it (the length
is off by at most a message's worth at the consuming end). A message put back after a
worker died (the sweep, kombu's restore) goes back without its fillers: the queue then
counts it as one job, an undercount that lasts until it is fetched again.
"""

from __future__ import annotations

import kombu.transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from core.broker.queues import FILLER, JOBS_HEADER
from core.jobs import MAX_JOBS_PER_MESSAGE


def extra_jobs(message: dict) -> int:
    """Jobs in a message beyond the first (its ``JOBS_HEADER``), 0 without one."""
    n = (message.get("headers") or {}).get(JOBS_HEADER)
    # A header over the bound is not ours: no run of fillers from a hand-made message.
    ok = isinstance(n, int) and not isinstance(n, bool) and 1 < n <= MAX_JOBS_PER_MESSAGE
    return n - 1 if ok else 0


class FillingChannel(kombu_redis.Channel):
    def _put(self, queue, message, **kwargs):
        batch = kwargs.get("_publish_batch")
        super()._put(queue, message, **kwargs)
        if not (extra := extra_jobs(message)):
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        if batch is not None:  # kombu's publish batch: the same pipeline, right after
            batch.add("lpush", key, *[FILLER] * extra)
        else:
            with self.conn_or_acquire() as client:
                client.lpush(key, *[FILLER] * extra)


class FillingRedisTransport(kombu_redis.Transport):
    Channel = FillingChannel


class FillingSentinelChannel(FillingChannel, kombu_redis.SentinelChannel):
    """The same on kombu's Sentinel channel (a ``sentinel://`` broker URL)."""


class FillingSentinelTransport(kombu_redis.SentinelTransport):
    Channel = FillingSentinelChannel


FILLING_TRANSPORTS = {"redis": "core.broker.transport:FillingRedisTransport",
                      "sentinel": "core.broker.transport:FillingSentinelTransport"}
_KOMBU_OWN = dict(TRANSPORT_ALIASES)  # kombu's transports by URL scheme, as shipped


def install(transports: dict[str, str], *, replace: bool = False) -> None:
    """Make these URL schemes resolve to these transports in this process.

    Celery's ``broker_transport`` setting holds only until kombu's ``Connection.switch``:
    a failover to the next URL of a ``sentinel://a;sentinel://b`` list re-reads the
    transport from the URL's scheme (kombu says so in ``switch``), so a worker that
    failed over ran kombu's plain transport, without mmq's poison guards and fetch
    bookkeeping (workers/poison.py), and died on the first filler. kombu resolves a
    scheme through ``TRANSPORT_ALIASES``, here set for the process. Producers install
    ``FILLING_TRANSPORTS`` unless something was installed already (``replace=False``):
    a worker installs its guarded transports, which also fill, first."""
    for scheme, path in transports.items():
        if replace or TRANSPORT_ALIASES.get(scheme) == _KOMBU_OWN.get(scheme):
            TRANSPORT_ALIASES[scheme] = path
            # kombu memoises the class per scheme (get_transport_cls): forget it.
            kombu_transport._transport_cache.pop(scheme, None)
