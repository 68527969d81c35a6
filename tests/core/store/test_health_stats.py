"""What the alert rules watch, read from the store on its own clock (SQLite and PG):
live workers per modality, the oldest queued and running jobs, cancelled-while-running."""

from datetime import timedelta

from sqlalchemy import update

from core import store
from core.jobs import JobStatus


def _job(s, modality="text", **kw):
    return store.create_job(session=s, modality=modality, task="embed", text="x", **kw).id


def test_live_workers_count_only_leases_the_database_calls_live(sessions):
    with sessions.begin() as s:
        for w, m in (("text-a", "text"), ("text-b", "text"), ("image-a", "image")):
            store.renew_lease(session=s, worker=w, modality=m)
    with sessions.begin() as s:  # text-b's last heartbeat a minute ago: dead at lease 20 s
        s.execute(update(store.WorkerLease).where(store.WorkerLease.worker == "text-b")
                  .values(heartbeat_at=store.db_now(-60)))
    with sessions() as s:
        assert store.live_workers_by_modality(session=s, lease_s=20) == {"text": 1, "image": 1}
        assert store.live_workers_by_modality(session=s, lease_s=120) == {"text": 2, "image": 1}


def test_oldest_queued_and_running_are_aged_on_the_database_clock(sessions):
    with sessions.begin() as s:
        old, new, run = _job(s), _job(s), _job(s, modality="audio")
        _job(s, modality="image")
        s.execute(update(store.Job).where(store.Job.id == old)
                  .values(created_at=store.db_now(-300)))
    with sessions.begin() as s:
        store.start_jobs(session=s, job_ids=[run], worker="audio-w")
        s.execute(update(store.Job).where(store.Job.id == run)
                  .values(started_at=store.db_now(-90)))
    with sessions() as s:
        now = store.db_time(session=s)
        oldest = store.oldest_active(session=s)
    assert set(oldest) == {("text", "queued"), ("image", "queued"), ("audio", "running")}
    assert 299 <= (now - oldest[("text", "queued")]).total_seconds() < 330
    assert 89 <= (now - oldest[("audio", "running")]).total_seconds() < 120
    assert (now - oldest[("image", "queued")]) < timedelta(seconds=30)
    assert new  # a younger queued job does not change the text figure


def test_cancelled_while_running_counts_only_started_jobs(sessions):
    with sessions.begin() as s:
        a, b, c = _job(s), _job(s), _job(s)
    with sessions.begin() as s:
        store.start_jobs(session=s, job_ids=[a, b], worker="w")
    with sessions.begin() as s:
        assert store.cancel_job(session=s, job_id=a)
        assert store.cancel_job(session=s, job_id=c)  # before it ran: not counted
    with sessions() as s:
        assert store.cancelled_while_running(session=s) == {"text": 1}
        assert store.get_job(session=s, job_id=a).status == JobStatus.CANCELLED.value
