"""Server-Sent Events of jobs' status changes, for ``GET /v1/jobs/{id}/events`` (JSON
events) and the results page (rendered rows): what both stream, the page's own
rendering aside.

The stream reads the jobs' (status, attempts, started) from SQL every 50 ms growing to
500 ms while nothing changes (one query for all the stream's unfinished jobs), and ends
when every job is terminal (an ``end`` event), or after ``MMQ_EVENTS_MAX_S`` (a
``timeout`` event: reconnect). A change that happened
between two reads is still told: a job read ``queued`` and then ``succeeded`` was
``running`` in between (its row says it started), so that event is sent too, in order;
a stream opened late starts with the states the job has passed through. Each job's
states therefore arrive in order, ``queued``, ``running`` (again for each new
attempt), then its final one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from core.jobs import TERMINAL

State = tuple[str, int, bool]  # status, attempts, ever started (core/store job_states)
KEEPALIVE_S = 15.0
MAX_IDS = 100  # jobs in one stream
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no proxy buffering


def sse(event: str, data: str, event_id: str | None = None) -> str:
    """One SSE message; ``data`` may span lines (each becomes a ``data:`` line)."""
    lines = [f"event: {event}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in (data.splitlines() or [""])]
    return "\n".join(lines) + "\n\n"


def changes(prev: State | None, cur: State) -> list[str]:
    """The statuses to tell, in order, going from ``prev`` (None: nothing told yet)."""
    status, attempts, started = cur
    if prev is None:
        told = ["queued"]
        if status != "queued" and (started or status == "running"):
            told.append("running")
        if status in TERMINAL:
            told.append(status)
        return told
    if prev == cur:
        return []
    if status == "running":
        return ["running"]  # from queued, or a new attempt after its worker died
    if status in TERMINAL and prev[0] == "queued" and started:
        return ["running", status]
    return [status]


async def job_events(read: Callable[[list[str]], dict[str, State]], ids: list[str], *,
                     render: Callable[[str, str, State], Awaitable[str]],
                     max_s: float) -> AsyncIterator[str]:
    """The SSE text of ``ids``' status changes. ``read`` (blocking, run in the thread
    pool) -> the current state of those ids it can see; ``render(id, status, state)``
    -> one SSE message. A job that disappears (another key's, or deleted) ends."""
    told: dict[str, State | None] = dict.fromkeys(ids)
    pending = list(ids)
    end = time.monotonic() + max_s
    quiet_since, delay = time.monotonic(), 0.05
    # EventSource reconnects after 2 s if the stream breaks; sent with the first event
    # (alone, some clients take it for an event with no data).
    retry = "retry: 2000\n"
    while pending:
        states = await run_in_threadpool(read, pending)
        moved = False
        for job_id in pending:
            cur = states.get(job_id)
            if cur is None:
                yield sse("gone", f'{{"id": "{job_id}"}}')
                told[job_id] = ("gone", 0, False)
                continue
            for status in changes(told[job_id], cur):
                moved = True
                yield retry + await render(job_id, status, cur)
                retry = ""
            told[job_id] = cur
        pending = [j for j in pending if told[j] is not None and told[j][0] not in TERMINAL
                   and told[j][0] != "gone"]
        if not pending:
            # Said, so that an EventSource closes instead of reconnecting to a stream
            # that would tell the same history again.
            yield retry + sse("end", "{}")
            break
        now = time.monotonic()
        if now >= end:
            yield sse("timeout", '{"reconnect": true}')
            break
        if moved:
            quiet_since, delay = now, 0.05
        elif now - quiet_since >= KEEPALIVE_S:
            yield ": keepalive\n\n"  # a comment: keeps proxies from closing an idle stream
            quiet_since = now
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)
