"""The submit service: what ``POST /v1/jobs``, ``/v1/jobs:batch`` and the page's submit
form all do with a request's items, and with the same refusals. It reserves room in the
modality queues (429 when one is over ``MMQ_MAX_QUEUE_DEPTH``), then lets the SDK
validate, write the job rows and send the task messages.
"""

from __future__ import annotations

import logging
from collections import Counter

import redis
from fastapi import FastAPI, Request

from core import store
from core.broker.admission import Admission, release_room, reserve_room
from core.config import Settings
from core.errors import InvalidInput, brief_error
from core.jobs import MODALITIES
from producer.sdk import Client, IdempotencyConflict
from producer.web.auth import Caller
from producer.web.errors import ERROR_CODES, INPUT_STATUS, RETRY_AFTER_S, ApiError

log = logging.getLogger("mmq.api")


def submit(request: Request, items: list[dict], caller: Caller,
           idempotency_key: str | None) -> tuple[list[str], bool]:
    """Backpressure, then the SDK's validate + write + send: (job ids, replayed). Runs
    in the thread pool. ``POST /v1/jobs`` and the page's submit form both come here,
    so the form refuses what the API refuses, with the same status."""
    app = request.app
    client: Client = app.state.client
    key = None
    if idempotency_key:  # scoped per API key: two clients' keys never collide
        key = f"{caller.key_digest}:{idempotency_key}"
    replay = False
    if key:
        with client.sessions() as sess:
            replay = store.get_idempotency(session=sess, key=key) is not None
    try:  # bad input is a 4xx of its own, whether or not the queue has room
        rows = client.validate(items)
    except InvalidInput as e:
        raise ApiError(INPUT_STATUS.get(e.kind, 422), _input_code(e), str(e),
                       details=None if e.index is None else [{"item": e.index}]) from None
    room = None
    if not replay:  # a replay queues nothing, so the queue limit does not apply to it
        room = _check_queue_room(app, Counter(str(i.get("modality")) for i in items))
    try:
        sub = client.submit_valid(rows, idempotency_key=key, owner=caller.key_id)
    except IdempotencyConflict as e:
        raise ApiError(409, "idempotency_conflict", str(e)) from None
    finally:  # the messages are in the queue now (or never will be): they count there
        _release_queue_room(app, room)
    return sub.ids, sub.replayed


def _input_code(e: InvalidInput) -> str:
    return ERROR_CODES[INPUT_STATUS.get(e.kind, 422)]


def _check_queue_room(app: FastAPI, wanted: Counter) -> Admission | None:
    """Reserve room for the jobs in their queues, or 429. One Redis script checks and
    reserves, so concurrent submits cannot all pass the check and overfill a queue."""
    s: Settings = app.state.settings
    if s.max_queue_depth <= 0:
        return None
    mods = {m: n for m, n in wanted.items() if m in MODALITIES}
    try:
        room = reserve_room(app.state.redis, mods, s.max_queue_depth)
    except redis.RedisError as e:
        raise ApiError(503, "unavailable", f"the queue (Redis) is unreachable: {e}",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    if room.admitted:
        return room
    full = {m: n for m, n in room.depths.items() if n + wanted[m] > s.max_queue_depth}
    if full:
        m, n = next(iter(full.items()))
        raise ApiError(429, "queue_full", f"the {m} queue holds {n} jobs (limit "
                       f"{s.max_queue_depth}); retry later",
                       details={"queue_depth": full}, headers={"Retry-After": str(RETRY_AFTER_S)})


def _release_queue_room(app: FastAPI, room: Admission | None) -> None:
    if room is None:
        return
    try:
        release_room(app.state.redis, room)
    except redis.RedisError as e:  # the reservation's expiry frees it later
        log.warning("could not release queue room %s: %s", room.token, brief_error(e))
