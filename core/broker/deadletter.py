"""The dead-letter list: messages that were on a queue but are not valid mmq tasks.

A worker that meets one acknowledges it (so it leaves the queue and kombu's
``unacked`` hash and cannot kill the next worker too) and appends it here with
its reason; ``mmq dead`` lists, shows and drops the entries. The list lives in
the broker's Redis, beside the queues it came from.

Layout: one Redis list ``mmq:dead-letters``, oldest entry first (index 0), each
entry one JSON object (``DeadLetter``). Appends trim it to the newest
``max_len`` entries in the same transaction.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass

import redis

from core.broker.queues import DEAD_LETTERS

KEY = DEAD_LETTERS

# Reasons: a small fixed vocabulary (a Prometheus label, so never free text);
# ``DeadLetter.detail`` says the particulars.
UNDECODABLE = "undecodable"  # the bytes on the queue are not JSON
NOT_AN_ENVELOPE = "not-an-envelope"  # JSON, but not a kombu message (a list, no properties)
CONTENT_TYPE = "content-type"  # a serializer the workers do not accept (pickle, yaml)
UNKNOWN_TASK = "unknown-task"  # no such mmq task
BAD_BODY = "bad-body"  # the task's arguments are not [args, kwargs, embed] or do not fit it
UNKNOWN_JOB = "unknown-job"  # a valid task for a job id that no SQL row has
UNHANDLED = "unhandled"  # Celery could not take the message for any other reason
REASONS = (UNDECODABLE, NOT_AN_ENVELOPE, CONTENT_TYPE, UNKNOWN_TASK, BAD_BODY, UNKNOWN_JOB,
           UNHANDLED)


@dataclass
class DeadLetter:
    reason: str  # one of REASONS
    queue: str  # the queue the message was taken from
    time: float  # when it was dead-lettered (Unix seconds)
    raw: str  # the message as it was on the queue: UTF-8 text, or base64 if raw_base64
    detail: str = ""  # human-readable particulars (the exception, the task name)
    task_id: str | None = None  # the Celery task id, when the envelope had one
    worker: str | None = None  # the worker that took it
    raw_base64: bool = False

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw) if self.raw_base64 else self.raw.encode()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: bytes | str) -> DeadLetter:
        d = json.loads(text)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def shape(value: object) -> str:
    """What a value is, not what it holds: for a ``detail``, which workers log (a
    message's body may be a user's data; the entry's ``raw`` keeps it)."""
    if isinstance(value, list | tuple | dict):
        return f"a {type(value).__name__} of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, str):
        return f"a str of {len(value)} character{'s' * (len(value) != 1)}"
    return "None" if value is None else f"a {type(value).__name__}"


def clip(text: str | None, limit: int = 200) -> str | None:
    """At most ``limit`` characters of a header or detail, for a log line, marked as
    cut: a hand-made message's fields may be any length."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def make(*, reason: str, queue: str, raw: bytes | str, detail: str = "",
         task_id: str | None = None, worker: str | None = None) -> DeadLetter:
    if isinstance(raw, str):
        text, b64 = raw, False
    else:
        try:
            text, b64 = raw.decode("utf-8"), False
        except UnicodeDecodeError:  # keep the exact bytes, for whoever investigates
            text, b64 = base64.b64encode(raw).decode(), True
    return DeadLetter(reason=reason, queue=queue, time=time.time(), raw=text, detail=detail,
                      task_id=task_id, worker=worker, raw_base64=b64)


def push(client: redis.Redis, *, reason: str, queue: str, raw: bytes | str, max_len: int,
         detail: str = "", task_id: str | None = None, worker: str | None = None
         ) -> DeadLetter:
    """Append one entry, dropping the oldest beyond ``max_len``."""
    entry = make(reason=reason, queue=queue, raw=raw, detail=detail, task_id=task_id,
                 worker=worker)
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(KEY, entry.to_json()).ltrim(KEY, -max(1, max_len), -1).execute()
    return entry


def count(client: redis.Redis) -> int:
    return int(client.llen(KEY))


def list_entries(client: redis.Redis, start: int = 0, stop: int = -1) -> list[DeadLetter]:
    """Entries ``start..stop`` (inclusive, as LRANGE), oldest first."""
    return [DeadLetter.from_json(x) for x in client.lrange(KEY, start, stop)]


def get(client: redis.Redis, index: int) -> DeadLetter | None:
    raw = client.lindex(KEY, index) if index >= 0 else None
    return DeadLetter.from_json(raw) if raw is not None else None


def drop(client: redis.Redis, index: int) -> bool:
    """Remove the entry at ``index``. By value, not by position: if a trim shifted
    the list meanwhile, an entry that moved is not removed in its place."""
    raw = client.lindex(KEY, index) if index >= 0 else None
    return raw is not None and bool(client.lrem(KEY, 1, raw))


def drop_all(client: redis.Redis) -> int:
    """Remove every entry; -> how many there were."""
    with client.pipeline(transaction=True) as pipe:
        n, _ = pipe.llen(KEY).delete(KEY).execute()
    return int(n)
