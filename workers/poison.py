"""Poison messages: anything on a queue that is not a valid mmq task is acknowledged
and moved to the dead-letter list (core/broker/deadletter.py), never left to stop a worker.

Celery treats some malformed messages as fatal: a body that is not
``[args, kwargs, embed]`` raises out of its strategy ("Unrecoverable error"), the
worker exits, and kombu restores the message for the next worker to die on. Bytes
that are not JSON, or JSON that is not a kombu envelope, fail even earlier, in
kombu's Redis transport. Two guards, one per layer:

- ``GuardedRedisTransport`` (``GuardedSentinelTransport`` for Sentinels): kombu's
  Redis transport, whose channel checks each popped item is a JSON envelope kombu can
  read before delivering it (its QoS also records which worker fetched each message:
  see ``OwnedQoS``);
- ``guard_task_handler``: wraps Celery's task-message handler (see
  ``EventBatchingConsumer`` in workers/app.py): checks the task name, content
  type and body shape before Celery sees the message, and dead-letters anything
  Celery's strategy still raises on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from functools import cached_property, partial

import redis
from kombu.exceptions import ContentDisallowed
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from core.broker import deadletter
from core.broker.deadletter import clip, shape
from core.broker.queues import FETCHED_BY, FILLER
from core.broker.redis_client import redis_for
from core.broker.transport import FillingChannel
from core.config import get_settings
from core.errors import brief_error
from core.jobs import MAX_JOBS_PER_MESSAGE, RUN_JOB_TASK, RUN_JOBS_TASK
from workers.acks import AckBatcher, after_teardown

log = logging.getLogger("mmq.worker")

# Called with each entry after it is stored (the Prometheus exporter counts them).
listeners: list[Callable[[deadletter.DeadLetter], None]] = []
worker_name = f"{socket.gethostname()}:{os.getpid()}"  # the consumer sets its node name
_client: redis.Redis | None = None
_client_lock = threading.Lock()


def _redis() -> redis.Redis:
    global _client
    with _client_lock:
        if _client is None:
            _client = redis_for(get_settings(), socket_timeout=10)
        return _client


def dead_letter(*, reason: str, queue: str, raw: bytes | str, detail: str,
                task_id: str | None = None, task: object = None) -> None:
    """Store, log one line, count. The line says what it was (reason, queue, task name
    and id, size, ``detail``), never its body: a poison message may be another
    application's task or a producer's mistake, holding a user's data; the body is in
    the list (``mmq dead show``). If Redis refuses it, the line says so and the message
    is dropped (the caller acknowledges anyway: one that kills workers must not stay)."""
    fields = dict(reason=reason, queue=queue, raw=raw, detail=detail, task_id=task_id,
                  worker=worker_name)
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "replace"))
    lost = ""
    try:
        entry = deadletter.push(_redis(), max_len=get_settings().dead_letter_max, **fields)
    except redis.RedisError as e:
        entry = deadletter.make(**fields)
        lost = f"; not stored ({brief_error(e)}), so dropped"
    log.error("dead letter: %s from queue %r: task %s, id %s, %d bytes: %s%s", reason, queue,
              clip(task if isinstance(task, str) else None), clip(task_id), size,
              clip(detail, 500), lost)
    for fn in listeners:
        try:
            fn(entry)
        except Exception:  # a metrics sink must not break consumption
            log.exception("dead-letter listener failed")


# -- layer 1: the transport ---------------------------------------------------------------

class OwnedQoS(kombu_redis.QoS):
    """kombu's ack emulation, plus the name of the worker that fetched each message
    (``FETCHED_BY``), written and removed in the same transaction as the ``unacked``
    entry. The sweep then restores the fetched-but-unstarted messages of a worker as
    soon as the store says its lease is dead (core/broker/sweep.py), instead of
    guessing from kombu's fetch time, which is the fetching host's wall clock.

    Messages fetched together (``GuardedChannel._brpop_read``) get their entries in one
    transaction (``append_many``), and acknowledgements are written in groups by one
    thread (workers/acks.py).

    The prefetch limit counts jobs, not messages: a ``run_jobs`` message weighs its
    number of jobs (``weigh``), so a worker holds at most its prefetch count of jobs
    (plus one message's worth) whether they came one or sixteen to a message, and other
    workers get their share of a burst."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._acks = AckBatcher(self._write_acks, partial(virtual.QoS.ack, self))
        # Tags whose unacked entry append_many wrote: append only tracks them.
        self._written: set = set()
        self._weights: dict = {}  # delivery tag -> jobs in it, for those over one

    def weigh(self, delivery_tag, jobs: int) -> None:
        if jobs > 1:
            self._weights[delivery_tag] = jobs

    def _jobs_held(self) -> int:
        # Copies first (each one C call under the GIL): the ack thread marks tags dirty
        # while the consumer thread counts.
        delivered, dirty, weights = list(self._delivered), set(self._dirty), self._weights
        return sum(weights.get(t, 1) for t in delivered if t not in dirty)

    def can_consume(self) -> bool:
        pcount = self.prefetch_count
        return not pcount or self._jobs_held() < pcount

    def can_consume_max_estimate(self):
        pcount = self.prefetch_count
        if pcount:
            return max(pcount - self._jobs_held(), 0)
        return None

    def _flush(self) -> None:
        """kombu's (drop the acknowledged and rejected tags), and their weights."""
        dirty, delivered, weights = self._dirty, self._delivered, self._weights
        while True:
            try:
                tag = dirty.pop()
            except KeyError:
                break
            delivered.pop(tag, None)
            weights.pop(tag, None)

    def append(self, message, delivery_tag):
        if delivery_tag in self._written:  # written and tracked by append_many
            self._written.discard(delivery_tag)
            return
        # kombu's QoS.append (5.3-5.7) with the owner in the same MULTI/EXEC.
        delivery = message.delivery_info
        ex, rk = delivery["exchange"], delivery["routing_key"]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}) \
                .hset(self.unacked_key, delivery_tag, dumps([message._raw, ex, rk])) \
                .hset(FETCHED_BY, delivery_tag, worker_name) \
                .execute()
            virtual.QoS.append(self, message, delivery_tag)

    def append_many(self, messages: list, raws: list[str]) -> None:
        """The unacked entries of messages about to be delivered, in one transaction;
        ``append`` then only tracks them. Written before any is delivered, so that no
        ack can precede its message's entry. ``raws``: each message's JSON as popped,
        which the entry (``[envelope, exchange, routing key]``) embeds as it is rather
        than encoding the decoded envelope again."""
        now = time.time()
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {m.delivery_tag: now for m in messages})
            pipe.hset(self.unacked_key, mapping={
                m.delivery_tag: f"[{raw}, {dumps(m.delivery_info['exchange'])}, "
                                f"{dumps(m.delivery_info['routing_key'])}]"
                for m, raw in zip(messages, raws, strict=True)})
            pipe.hset(FETCHED_BY, mapping={m.delivery_tag: worker_name for m in messages})
            pipe.execute()
        # Tracked at once, delivered or not: if delivering one of them fails (the broker
        # went away), closing the channel restores the rest with it.
        for m in messages:
            virtual.QoS.append(self, m, m.delivery_tag)
        self._written.update(m.delivery_tag for m in messages)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        # Every ack, reject and restore (kombu's and at shutdown) goes through here.
        return super()._remove_from_indices(delivery_tag, pipe).hdel(FETCHED_BY, delivery_tag)

    def ack(self, delivery_tag) -> None:
        self._acks.ack(delivery_tag)  # written with others' by the ack thread

    def flush_acks(self) -> None:
        self._acks.flush()

    def _write_acks(self, tags: list) -> None:
        with after_teardown(self.channel, "acknowledgement"), self.pipe_or_acquire() as pipe:
            for tag in tags:
                self._remove_from_indices(tag, pipe)
            pipe.execute()

    def reject(self, delivery_tag, requeue=False) -> None:
        with after_teardown(self.channel, "rejection"):
            super().reject(delivery_tag, requeue=requeue)


class GuardedChannel(FillingChannel):
    """kombu's Redis channel, guarded; as a producer (the sweep's re-sends) it pushes
    fillers like any mmq producer (core/broker/transport.py)."""

    QoS = OwnedQoS

    def close(self) -> None:
        """kombu's close, surviving a broker that went away. Closing restores the
        channel's unacknowledged messages through a client built from
        ``self.connection.client``, which a connection torn down after Redis restarted
        has already set to None: the AttributeError escaped Celery's ignore_errors and
        the worker died ("Unrecoverable error", seen in bench/chaos.py's Redis-restart
        scenario). The messages are still in Redis's unacked hash (or gone with an
        emptied Redis); the sweep and the visibility timeout take it from there.

        Pending acknowledgements are written first: closing restores every message
        not yet acknowledged."""
        if isinstance(self._qos, OwnedQoS):
            self._qos.flush_acks()
        try:
            super().close()
        except AttributeError:
            if getattr(self.connection, "client", None) is not None:
                raise
            log.warning("broker connection closed under the channel; its unacknowledged "
                        "messages are left to the sweep")

    # Messages taken per fetch at most: the first by BRPOP, the rest by one RPOP.
    FETCH_MAX = 64

    def _brpop_read(self, **options):
        # kombu's Channel._brpop_read (kombu 5.3-5.7), with the JSON decode and the
        # envelope checked (upstream decodes inline, and what it raises there stops the
        # worker's event loop), and in bulk: once BRPOP has answered, the messages
        # behind it, as many as the prefetch limit has room for, are taken with one
        # RPOP and their unacked entries written in one transaction, instead of one
        # BRPOP and one transaction per message through the event loop. A message is
        # between the pop and its unacked entry for the same instant as in kombu's own
        # fetch (a worker killed there leaves its job queued with no message: the
        # sweep re-sends it, core/broker/sweep.py).
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP",
                                                        **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            key, item = dest__item
            key = bytes_to_str(key)
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            first = self._checked(item, dest)
            more = self._more(key, _jobs_in(first) if first is not None else 1)
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()
        checked = [(m, it) for m, it in [(first, item),
                                         *((self._checked(it, dest), it) for it in more)]
                   if m is not None]
        messages = [m for m, _ in checked]
        for m in messages:
            self.qos.weigh(m.delivery_tag, _jobs_in(m))
        if len(messages) > 1:
            self.qos.append_many(messages, [bytes_to_str(it) for _, it in checked])
        for m in messages:
            self._fetched[id(m._raw)] = m  # decoded once: basic_consume's callback takes it
            try:
                self.connection._deliver(m._raw, dest)
            finally:
                self._fetched.pop(id(m._raw), None)
        return True

    def _more(self, key: str, weight: int) -> list[bytes]:
        """The entries behind the first one (a message of ``weight`` jobs), one per job
        of room left: a run_jobs message is followed by a filler per extra job
        (core/broker/transport.py), so entries count jobs. Its own fillers are taken
        with it even past the room: left behind, they stood in the queue as phantom
        jobs until the worker next had room to fetch (seen as a queue not empty after
        every job had finished). (A batch put back without its fillers by kombu's own
        restore counts as one, so a fetch may then take a few messages past the room.)"""
        room = self.qos.can_consume_max_estimate()
        room = self.FETCH_MAX if room is None else room
        n = min(self.FETCH_MAX - 1, max(room - weight, weight - 1))
        if n <= 0 or self.global_keyprefix:  # (a prefixed client would prefix the key again)
            return []
        try:
            return self.client.rpop(key, n) or []
        except self.connection_errors:
            self.client.connection.disconnect()
            return []

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        """kombu's, with the Message that ``_checked`` built handed on, not built again."""
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        upstream = self.connection._callbacks[queue]

        def _callback(raw_message):
            message = self._fetched.pop(id(raw_message), None)
            if message is None or message._raw is not raw_message:
                return upstream(raw_message)
            if not no_ack:
                self.qos.append(message, message.delivery_tag)
            return callback(message)

        self.connection._callbacks[queue] = _callback

    @cached_property
    def _fetched(self) -> dict:
        return {}

    def _checked(self, item: bytes, queue: str):
        """The envelope as a kombu Message, or None after dead-lettering it (or for a
        filler, dropped: core/broker/transport.py). The item is already popped and not
        yet in the unacked hash: there is nothing to acknowledge."""
        if item == FILLER:
            return None
        try:
            payload = loads(bytes_to_str(item))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError (a position)
            dead_letter(reason=deadletter.UNDECODABLE, queue=queue, raw=item,
                        detail=f"not JSON: {e}")
            return None
        problem = self._envelope_problem(payload)
        if isinstance(problem, str):
            task_id = task = None
            if isinstance(payload, dict) and isinstance(payload.get("headers"), dict):
                task_id, task = payload["headers"].get("id"), payload["headers"].get("task")
            dead_letter(reason=deadletter.NOT_AN_ENVELOPE, queue=queue, raw=item,
                        detail=problem, task_id=task_id if isinstance(task_id, str) else None,
                        task=task)
            return None
        return problem

    def _envelope_problem(self, payload: object):
        """What is wrong with it (a str), or the kombu Message it makes."""
        if not isinstance(payload, dict):
            return f"a JSON {type(payload).__name__}, not a message envelope"
        try:
            # What kombu reads before Celery sees the message (Message(), qos.append).
            message = self.Message(payload, channel=self)
            info = message.delivery_info
            info["exchange"], info["routing_key"]  # noqa: B018
            if not isinstance(message.headers, dict):
                return "headers are not a JSON object"
            # kombu's QoS writes the tag into a Redis hash: None, a bool or a list raise
            # inside the event loop, which the worker does not survive.
            tag = message.delivery_tag
            if not isinstance(tag, str | int) or isinstance(tag, bool):
                return f"delivery_tag is a {type(tag).__name__}, not a string"
        except Exception as e:  # noqa: BLE001  (anything here is a malformed envelope)
            return f"kombu cannot read it: {brief_error(e)}"
        return message


def _jobs_in(message) -> int:
    """Jobs a message carries: a run_jobs message's list (its body decoded here once,
    kombu caches it for Celery), else 1. A malformed body weighs 1: the task handler
    dead-letters it."""
    if message.headers.get("task") != RUN_JOBS_TASK:
        return 1
    try:
        ids = message.decode()[0][0]
    except Exception:  # noqa: BLE001  (dead-lettered later, by task_problem)
        return 1
    return len(ids) if isinstance(ids, list) and ids else 1


class GuardedRedisTransport(kombu_redis.Transport):
    Channel = GuardedChannel


class GuardedSentinelChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """The same guard on kombu's Sentinel channel (a ``sentinel://`` broker URL): the
    guard overrides how a popped item is read and how the channel closes, the Sentinel
    channel only how its connection pool finds the primary."""


class GuardedSentinelTransport(kombu_redis.SentinelTransport):
    Channel = GuardedSentinelChannel


# -- layer 2: Celery's task handler -------------------------------------------------------

def task_problem(message, tasks: dict) -> tuple[str, str] | None:
    """(reason, detail) if ``message`` is not a task this worker can run, else None."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    name = headers.get("task")
    if not isinstance(name, str):
        return deadletter.UNKNOWN_TASK, "no 'task' header (not a Celery protocol 2 message)"
    task = tasks.get(name)
    if task is None or name.startswith("celery."):
        return deadletter.UNKNOWN_TASK, f"no task {name!r} in an mmq worker"
    if not isinstance(headers.get("id"), str):
        return deadletter.BAD_BODY, "no task id"
    try:
        body = message.decode()
    except ContentDisallowed as e:
        return deadletter.CONTENT_TYPE, f"{message.content_type!r} refused: {e}"
    except Exception as e:  # noqa: BLE001  (a body the accepted serializer cannot read)
        return deadletter.BAD_BODY, f"cannot decode the body: {brief_error(e)}"
    # The details say what is wrong, never what the body holds: they are logged.
    if not (isinstance(body, list | tuple) and len(body) == 3
            and isinstance(body[0], list | tuple) and isinstance(body[1], dict)
            and isinstance(body[2], dict | None)):
        return deadletter.BAD_BODY, f"body is not [args, kwargs, embed]: {shape(body)}"
    args, kwargs, _ = body
    try:
        task.__header__(*args, **kwargs)  # the task's signature, without running it
    except TypeError as e:
        return deadletter.BAD_BODY, f"arguments do not fit {name}: {e}"
    if name == RUN_JOB_TASK:
        job_id = args[0] if args else kwargs.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            return deadletter.BAD_BODY, f"job id is {shape(job_id)}, not a string"
    if name == RUN_JOBS_TASK:
        ids = args[0] if args else kwargs.get("job_ids")
        if not (isinstance(ids, list) and 0 < len(ids) <= MAX_JOBS_PER_MESSAGE
                and all(isinstance(i, str) and i for i in ids)):
            return deadletter.BAD_BODY, (f"job ids are {shape(ids)}, not a list of 1 to "
                                         f"{MAX_JOBS_PER_MESSAGE} strings")
    return None


def guard_task_handler(handler: Callable, tasks: dict,
                       connection_errors: tuple) -> Callable:
    """Wrap Celery's ``on_task_received``: a message that is not a valid task is
    acknowledged and dead-lettered instead of reaching (and stopping) Celery."""

    def on_task_received(message) -> None:
        try:
            problem = task_problem(message, tasks)
        except Exception as e:  # noqa: BLE001  (a shape the checks did not foresee)
            problem = deadletter.UNHANDLED, brief_error(e)
        if problem is None:
            try:
                return handler(message)
            except connection_errors:
                raise  # the broker went away: Celery's consumer reconnects
            except Exception as e:  # noqa: BLE001  (Celery calls these unrecoverable)
                problem = deadletter.UNHANDLED, brief_error(e)
        reject_as_dead(message, *problem)

    return on_task_received


def reject_as_dead(message, reason: str, detail: str) -> None:
    """Store first, then ack: a crash in between redelivers it (a duplicate entry),
    never loses it."""
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id")
    dead_letter(reason=reason, queue=info.get("routing_key") or "?",
                raw=_raw(message), detail=detail,
                task_id=task_id if isinstance(task_id, str) else None, task=headers.get("task"))
    message.ack()


def _raw(message) -> str:
    """The envelope as kombu stored it in Redis (base64 body and all)."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        return json.dumps(raw)
    return repr(message.body)[:100_000]


def _job_list(args) -> list:
    """A run_jobs request's job ids (its first argument), else []."""
    first = args[0] if isinstance(args, list | tuple) and args else None
    return first if isinstance(first, list) else []


def dead_letter_unknown_job(job_id: str) -> None:
    """A valid run_job(s) message with a job id that no SQL row has (another deployment's
    queue, a hand-made message). The task then returns and its message is acked."""
    from celery.worker import state

    request = next((r for r in list(state.active_requests)
                    if r.id == job_id or job_id in _job_list(r.args)), None)
    message = getattr(request, "message", None)
    info = getattr(request, "delivery_info", None) or {}
    raw = _raw(message) if message is not None else json.dumps({"task_id": job_id})
    dead_letter(reason=deadletter.UNKNOWN_JOB, queue=info.get("routing_key") or "?", raw=raw,
                detail=f"no job {job_id} in the store", task_id=job_id,
                task=getattr(request, "name", None))
