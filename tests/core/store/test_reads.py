"""The store's reads for producers (the API, the results page, the SDK, `mmq top`):
keyset pages and their cursors, statuses and the poller, the dashboards' counts."""

import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from core import store
from core.jobs import JobResult


def _jobs(sessions, n, **kw):
    with sessions.begin() as s:
        return [store.create_job(session=s, modality="text", text=f"t{i}",
                                 **{"task": "embed", **kw}).id for i in range(n)]


def _succeed(sessions, job_id, result=None):
    with sessions.begin() as s:
        attempt = store.start_jobs(session=s, job_ids=[job_id], worker="w")[job_id].attempts
        assert store.finish_jobs(session=s, model_version="v", attempts={job_id: attempt},
                                 results={job_id: result or JobResult(
                                     embedding=np.ones(4, np.float32), text="said")})


@pytest.mark.parametrize("at", [datetime(2026, 1, 2, 3, 4, 5, 678901),
                                datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)])
def test_a_cursor_round_trips_at_full_precision(at):
    # SQLite gives naive UTC, PostgreSQL aware: both decode to the same aware instant.
    assert store.decode_cursor(store.encode_cursor(at, "abc")) == (
        at.replace(tzinfo=UTC), "abc")


@pytest.mark.parametrize("bad", ["garbage", "", "W10", "WzEsMl0", "bm90IGpzb24"])
def test_a_cursor_it_did_not_make_is_a_value_error(bad):
    with pytest.raises(ValueError, match="not a page cursor"):
        store.decode_cursor(bad)


def test_pages_follow_cursors_with_the_task_filter(sessions):
    embeds = _jobs(sessions, 5)
    _jobs(sessions, 2, task="classify", params={"labels": ["a"]})
    seen, before = [], None
    with sessions() as s:
        while page := store.list_jobs(session=s, task="embed", limit=2, before=before):
            seen += [j.id for j in page]
            last = page[-1]
            before = store.decode_cursor(store.encode_cursor(last.created_at, last.id))
    assert sorted(seen) == sorted(embeds) and len(seen) == len(set(seen))


def test_statuses_owners_and_the_poller(sessions):
    mine, = _jobs(sessions, 1, owner="k1")
    other, = _jobs(sessions, 1, owner="k2")
    with sessions() as s:
        assert store.job_statuses(session=s, job_ids=[mine, other], owner="k1") == {
            mine: "queued"}
        assert store.queued_among(session=s, job_ids=[mine, "nope"]) == [mine]
    t0 = time.monotonic()
    last = store.wait_statuses(sessions, [mine, other, "nope"], timeout=0.05, poll=0.01,
                               max_poll=0.02, owner="k1")
    assert last == {mine: "queued", other: None, "nope": None}
    assert time.monotonic() - t0 < 5
    _succeed(sessions, mine)
    assert store.wait_statuses(sessions, [mine], timeout=60, poll=0.01, max_poll=0.02) == {
        mine: "succeeded"}
    assert store.wait_statuses(sessions, [], timeout=1, poll=0.01, max_poll=0.02) == {}


@pytest.mark.parametrize("timeout", [float("nan"), -1.0])
def test_the_poller_refuses_a_timeout_it_could_not_end(sessions, timeout):
    """timeout=nan polled for ever: time.monotonic() > nan is never true."""
    job, = _jobs(sessions, 1)
    raised: list[BaseException] = []

    def wait():
        try:
            store.wait_statuses(sessions, [job], timeout=timeout, poll=0.01, max_poll=0.02)
        except ValueError as e:
            raised.append(e)

    t = threading.Thread(target=wait, daemon=True)  # a thread: it never ended
    t.start()
    t.join(10)
    assert not t.is_alive() and raised and "timeout" in str(raised[0])


def test_what_the_dashboards_and_the_page_read(sessions):
    a, b = _jobs(sessions, 2, owner="k1")
    _succeed(sessions, a)
    with sessions.begin() as s:
        attempt = store.start_jobs(session=s, job_ids=[b], worker="w")[b].attempts
        assert store.fail_job(session=s, job_id=b, error="boom", attempt=attempt)
    with sessions() as s:
        assert store.succeeded_within(session=s, seconds=3600) == {"text": 1}
        assert [j.id for j in store.latest_failures(session=s, limit=5)] == [b]
        assert sorted(store.count_by_owner(session=s)) == [("k1", "failed", 1),
                                                            ("k1", "succeeded", 1)]
        assert store.latest_transcripts(session=s, limit=5) == []  # text jobs only
        assert store.prediction_summaries(session=s, job_ids=[a, b]) == {a: (None, "said", 4)}
        assert {j.id for j in store.jobs_by_id(session=s, job_ids=[a, b], owner="k2")} == set()
        assert {j.id for j in store.jobs_by_id(session=s, job_ids=[a, b])} == {a, b}


def test_an_idempotency_key_records_its_jobs(sessions):
    ids = _jobs(sessions, 2)
    with sessions.begin() as s:
        store.put_idempotency(session=s, key="k", request_hash="h", job_ids=ids,
                              created_at=store.db_time(session=s))
    with sessions() as s:
        row = store.get_idempotency(session=s, key="k")
    assert (row.request_hash, list(row.job_ids)) == ("h", ids)
