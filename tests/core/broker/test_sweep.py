"""`mmq requeue` (core.broker.sweep.requeue_stale) against a real Redis and real SQL:
it re-sends a queued job only when no message of that job is in Redis."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from core import store
from core.broker.queues import queued_job_ids
from core.broker.sender import producer_app, send_jobs
from core.broker.sweep import requeue_stale
from core.config import Settings
from core.store.migrations import upgrade


@pytest.fixture
def settings(broker_url, database_url) -> Settings:
    upgrade(database_url)
    return Settings(broker_url=broker_url, database_url=database_url)


def _queued_text_jobs(settings: Settings, n: int) -> list[str]:
    engine = store.make_engine(settings.db_url)
    try:
        with store.session_factory(engine).begin() as s:
            return [store.create_job(session=s, modality="text", task="embed",
                                     text=f"requeue {i}").id for i in range(n)]
    finally:
        engine.dispose()


def _ids_waiting(r: redis.Redis, queue: str) -> list[str]:
    return [j for raw in r.lrange(queue, 0, -1) for j in queued_job_ids(raw)]


def test_requeue_resends_only_jobs_without_a_live_message(settings):
    fetched, waiting, lost = _queued_text_jobs(settings, 3)
    app = producer_app(settings)
    r = redis.Redis.from_url(settings.broker_url)
    send_jobs(app, [(fetched, "text")])
    # A consumer takes the message without acknowledging it, as a worker does with
    # acks_late: kombu moves it to its `unacked` hash. The connection stays open (closing
    # the channel would put the message back on the queue).
    with Connection(settings.broker_url) as conn:
        message = conn.default_channel.basic_get("text", no_ack=False)
        assert message is not None and message.headers["id"] == fetched
        assert r.hlen("unacked") == 1 and _ids_waiting(r, "text") == []
        send_jobs(app, [(waiting, "text")])  # this one waits in the queue
        # All three are queued in SQL and older than the stale limit (0 s); only `lost`
        # has no message anywhere (its send failed, or Redis lost it).
        assert requeue_stale(settings, modalities=("text",), stale_s=0,
                             single_flight=False) == 1
        assert sorted(_ids_waiting(r, "text")) == sorted([waiting, lost])
        assert r.hlen("unacked") == 1
        # Its message is live now: a second sweep sends nothing, so it went out once.
        assert requeue_stale(settings, modalities=("text",), stale_s=0,
                             single_flight=False) == 0
        assert sorted(_ids_waiting(r, "text")) == sorted([waiting, lost])
    app.close()


def test_a_new_primary_gets_lost_messages_back_in_one_sweep(settings):
    """Redis restarted empty, or a replica promoted that never received the last
    messages: queued jobs whose message is gone are re-sent by the next sweep, not
    after ``requeue_stale_s`` (a failover took 68.6 s to recover with the minute-long
    wait); on the same primary, the minute-long wait still holds."""
    import time

    from core.broker.queues import BROKER_CHANGED
    from core.broker.sweep import NEW_PRIMARY_STALE_S, sweep

    r = redis.Redis.from_url(settings.broker_url)
    sweep(settings)  # the first sweep meets this primary
    r.delete(*r.keys(BROKER_CHANGED + "*"))  # ... as long ago
    ids = _queued_text_jobs(settings, 3)
    send_jobs(producer_app(settings), [(i, "text") for i in ids])
    with store.session_factory(store.make_engine(settings.db_url)).begin() as s:
        store.mark_sent(session=s, job_ids=ids)
    time.sleep(NEW_PRIMARY_STALE_S + 0.5)  # older than a send in flight, not a minute
    r.delete("text")  # the messages are gone, on the same primary: the minute holds
    assert not set(ids) & set(sweep(settings).resent)
    r.flushdb()  # the primary lost its data, as after an empty restart or a failover
    assert set(ids) <= set(sweep(settings).resent)  # (with other tests' queued jobs)
    assert set(ids) <= set(_ids_waiting(r, "text"))


def test_a_sweep_of_another_modality_set_does_not_take_the_same_primary_for_new(
        settings, caplog):
    """Workers sweep their own modality; `mmq requeue` sweeps all three. On the same
    primary its first sweep is no change of primary: it logged one, and turned on the
    3 s re-send for a minute, when the last run id seen was kept per modality set. A
    real change is still seen, and by every set, whichever sweeps first."""
    from core.broker.queues import BROKER_CHANGED
    from core.broker.sweep import _new_primary, sweep

    r = redis.Redis.from_url(settings.broker_url)
    sweep(settings, modalities=("text",))  # the text workers' sweep meets this primary
    r.delete(*r.keys(BROKER_CHANGED + "*"))  # ... as long ago
    caplog.clear()
    with caplog.at_level("WARNING"):
        sweep(settings)  # `mmq requeue`: every modality, the first time
        sweep(settings, modalities=("image",))
    assert not [rec for rec in caplog.records if "primary is new" in rec.getMessage()]
    assert r.keys(BROKER_CHANGED + "*") == []
    r.flushdb()  # an empty restart
    engine = store.make_engine(settings.db_url)
    try:
        with store.session_factory(engine)() as s:
            seen = _new_primary(r, settings, s)  # the text workers' sweep, say
            assert seen is not None
            # The image workers' sweep comes second, on the run id the first one stored:
            # it is told of the change too, and re-sends its own jobs at once.
            assert _new_primary(r, settings, s) == seen
            assert r.ttl(BROKER_CHANGED) > 0  # for requeue_stale_s, not for ever
    finally:
        engine.dispose()


def test_a_message_just_fetched_by_a_slow_clocked_worker_is_not_taken_from_it(settings):
    """A worker whose clock is 10 minutes slow fetches a job's message (kombu stamps the
    fetch with that worker's ``time.time()``) and has not started it yet. A sweep on a
    correct clock must not take it for a dead worker's message: it was fetched an
    instant ago. It did (put back at once: the job ran twice) while the sweep aged
    messages by kombu's per-host scores; it now ages them on Redis's clock. The mirror image: a fast
    worker's stamps lie in the future, and its fetched messages, if it dies, wait out
    the skew (10 minutes) before any sweep puts them back."""
    (job,) = _queued_text_jobs(settings, 1)
    app = producer_app(settings)
    r = redis.Redis.from_url(settings.broker_url)
    send_jobs(app, [(job, "text")])
    with Connection(settings.broker_url) as conn:
        message = conn.default_channel.basic_get("text", no_ack=False)
        assert message is not None and message.headers["id"] == job
        (tag,) = r.zrange("unacked_index", 0, -1)
        r.zadd("unacked_index", {tag: r.zscore("unacked_index", tag) - 600})  # slow clock
        requeue_stale(settings, modalities=("text",), single_flight=False)
        assert r.hlen("unacked") == 1 and _ids_waiting(r, "text") == []
    app.close()


def test_a_batch_message_counts_for_each_of_its_jobs_and_goes_back_once(new_broker, tmp_path):
    """A run_jobs message carries several jobs (Settings.jobs_per_message): the sweep
    must see each of them as having a message (else it re-sends them all), and a dead
    worker's fetched batch goes back onto the queue once, for all of its jobs. (A store
    of its own: the sweep re-sends any stale queued job it finds.)"""
    from core.broker.queues import FETCHED_BY
    from core.broker.sweep import sweep
    from core.jobs import RUN_JOBS_TASK

    settings = Settings(broker_url=new_broker(), database_url=f"sqlite:///{tmp_path}/s.db")
    upgrade(settings.db_url)
    ids = _queued_text_jobs(settings, 3)
    app = producer_app(settings)
    r = redis.Redis.from_url(settings.broker_url)
    send_jobs(app, [(i, "text") for i in ids], per_message=8)
    # One message, followed by a filler per extra job: the list's length counts jobs.
    assert r.llen("text") == 3 and sorted(_ids_waiting(r, "text")) == sorted(ids)
    assert requeue_stale(settings, modalities=("text",), stale_s=0, single_flight=False) == 0
    with Connection(settings.broker_url) as conn:
        message = conn.default_channel.basic_get("text", no_ack=False)
        assert message is not None and message.headers["task"] == RUN_JOBS_TASK
        r.ltrim("text", 1, 0)  # its fillers (a worker drops them as it fetches them)
        # Fetched by a worker whose lease is alive (no fetcher recorded, and younger than
        # a lease): left alone.
        assert requeue_stale(settings, modalities=("text",), stale_s=0,
                             single_flight=False) == 0
        (tag,) = r.hkeys("unacked")
        r.hset(FETCHED_BY, tag, "gone@nowhere:1")  # a fetcher with no lease: dead
        out = sweep(settings, modalities=("text",), stale_s=0)
        assert sorted(out.restored) == sorted(ids) and out.resent == []
        assert r.hlen("unacked") == 0 and r.llen("text") == 3  # back with its fillers
        assert sorted(_ids_waiting(r, "text")) == sorted(ids)
    app.close()
