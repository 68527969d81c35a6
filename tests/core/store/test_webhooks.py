"""The webhook outbox on SQLite and PostgreSQL: an event row is written by exactly the
transactions that end a job with a webhook_url (finish, fail, cancel), never by one
rolled back or fenced off; claims lease rows by the database's clock; attempts move a
delivery to delivered, due again, or failed once it is too old; the delivery loop
records an attempt that raised as a failed one."""

import base64
import time

import numpy as np
from sqlalchemy import select, update

from core import store
from core.config import Settings
from core.jobs import JobResult, JobStatus
from core.webhooks.deliver import Deliverer
from tests.helpers import free_port

URL = "http://hooks.example/receive"


def _job(sessions, url=URL):
    with sessions.begin() as s:
        return store.create_job(session=s, modality="text", task="embed", text="t",
                                webhook_url=url).id


def _start(sessions, job_id) -> int:
    with sessions.begin() as s:
        return store.start_jobs(session=s, job_ids=[job_id], worker="w")[job_id].attempts


def _outbox(sessions) -> dict[str, tuple[str, str, str]]:
    with sessions() as s:
        return {d.job_id: (d.id, d.event, d.status)
                for d in s.scalars(select(store.WebhookDelivery))}


def test_every_ending_writes_one_event_with_its_job(sessions):
    ok, bad, gone, late = (_job(sessions) for _ in range(4))
    plain = _job(sessions, url=None)
    attempts = {j: _start(sessions, j) for j in (ok, bad, plain, late)}
    with sessions.begin() as s:
        assert store.finish_jobs(session=s, model_version="v",
                                 results={j: JobResult(embedding=np.ones(4, np.float32))
                                          for j in (ok, plain)},
                                 attempts=attempts) == {ok, plain}
        assert store.fail_job(session=s, job_id=bad, error="boom", attempt=attempts[bad])
        assert store.cancel_job(session=s, job_id=gone)  # queued -> cancelled
        assert store.cancel_job(session=s, job_id=late)  # running -> cancelled
    with sessions.begin() as s:  # the late attempt's outcome is fenced off: no 2nd event
        assert not store.fail_job(session=s, job_id=late, error="x", attempt=attempts[late])
        assert not store.cancel_job(session=s, job_id=gone)
    assert _outbox(sessions) == {
        ok: (f"msg_{ok}", "job.succeeded", "pending"),
        bad: (f"msg_{bad}", "job.failed", "pending"),
        gone: (f"msg_{gone}", "job.cancelled", "pending"),
        late: (f"msg_{late}", "job.cancelled", "pending")}


def test_a_rolled_back_ending_leaves_no_event(sessions):
    j = _job(sessions)
    a = _start(sessions, j)
    s = sessions()
    s.begin()
    assert store.fail_job(session=s, job_id=j, error="boom", attempt=a)
    s.rollback()
    s.close()
    assert _outbox(sessions) == {}
    assert _row_status(sessions, j) == "running"


def _row_status(sessions, j):
    with sessions() as s:
        return store.get_job(session=s, job_id=j).status


def test_claims_lease_rows_and_attempts_move_them_on(sessions):
    a, b = _job(sessions), _job(sessions)
    with sessions.begin() as s:
        store.cancel_job(session=s, job_id=a)
        store.cancel_job(session=s, job_id=b)
        first = store.claim_due(session=s, limit=1, lease_s=60)
    with sessions.begin() as s:  # the leased row is not due for anyone else
        second = store.claim_due(session=s, limit=10, lease_s=60)
    with sessions.begin() as s:
        assert store.claim_due(session=s, limit=10, lease_s=60) == []
    assert {c.job_id for c in first + second} == {a, b} and len(first) == len(second) == 1
    c1, c2 = first[0], second[0]
    with sessions.begin() as s:  # a failure: due again later, not now
        assert store.record_attempt(session=s, claimed=c1, status_code=503, error="HTTP 503",
                                    duration_ms=3.0, retry_in_s=0.3,
                                    retry_for_s=3600) == "pending"
        assert store.record_attempt(session=s, claimed=c2, status_code=204, error=None,
                                    duration_ms=2.0, retry_in_s=1, retry_for_s=3600
                                    ) == "delivered"
        assert store.claim_due(session=s, limit=10, lease_s=60) == []
    time.sleep(0.4)
    with sessions.begin() as s:
        (again,) = store.claim_due(session=s, limit=10, lease_s=60)
        assert (again.id, again.attempts) == (c1.id, 1)
        # A stale claim (its lease ran out and the row was claimed again) changes nothing.
        assert store.record_attempt(session=s, claimed=c1, status_code=200, error=None,
                                    duration_ms=1.0, retry_in_s=1, retry_for_s=3600) is None
        # Too old to retry: failed, by the database's clock.
        s.execute(update(store.WebhookDelivery).where(store.WebhookDelivery.id == again.id)
                  .values(created_at=store.db_now(-7200)))
        assert store.record_attempt(session=s, claimed=again, status_code=None,
                                    error="refused", duration_ms=1.0, retry_in_s=1,
                                    retry_for_s=3600) == "failed"
    with sessions() as s:
        (hook,) = store.job_webhooks(session=s, job_id=c1.job_id)
        assert (hook["status"], hook["attempts"], hook["next_attempt_at"]) == ("failed", 2, None)
        assert [h["status_code"] for h in hook["history"]] == [503, 200, None]
        assert store.webhook_counts(session=s) == {"pending": 0, "failing": 0, "failed": 1}
    assert _row_status(sessions, a) == JobStatus.CANCELLED.value


def test_an_attempt_that_raises_is_recorded_and_the_others_go_on(sessions):
    # A URL stored before the submit checks refused it (or with MMQ_WEBHOOK_ALLOW_PRIVATE
    # then): resolving a..b raises UnicodeError. Before, that escaped the turn, and the
    # delivery stayed pending with 0 attempts forever, retried every poll.
    bad, other = _job(sessions, url="http://a..b/"), _job(sessions,
                                                        url=f"http://127.0.0.1:{free_port()}/")
    with sessions.begin() as s:
        store.cancel_job(session=s, job_id=bad)
        store.cancel_job(session=s, job_id=other)
    settings = Settings(webhook_secret="whsec_" + base64.b64encode(b"k" * 32).decode(),
                        webhook_allow_private=True, webhook_timeout_s=2)
    deliverer = Deliverer(sessions, settings)
    try:
        assert deliverer.run_once() == 2
    finally:
        deliverer.stop()
    with sessions() as s:
        hooks = {j: store.job_webhooks(session=s, job_id=j)[0] for j in (bad, other)}
    for j, hook in hooks.items():
        assert (hook["status"], hook["attempts"]) == ("pending", 1), j
        assert hook["last_error"] == hook["history"][0]["error"]
    assert "UnicodeError" in hooks[bad]["last_error"]
    assert "refused" in hooks[other]["last_error"].lower()
