"""The results store: jobs, their payloads and their predictions, in SQL.

SQLAlchemy 2.x on SQLite (embedded default, WAL mode) or PostgreSQL. The job row
is the source of truth for a job's state. Payload bytes are stored here, content
addressed in ``blobs`` (the claim check: only job ids travel through Redis).
Predictions are upserted by job id, so a job delivered twice has one prediction.
Store functions take keyword-only arguments and a session; callers own commits.

Every SQL statement lives in this package, one module per concern: ``tables``
(the schema, engines, the database clock), ``db`` (reachability, the server's time,
the dialect's INSERT), ``blobs`` (payloads), ``jobs`` (create, read, list, cancel),
``runs`` (a worker's start, finish and failure, fenced), ``leases`` (worker leases
and orphaned jobs), ``idempotency``, ``stats``, ``versions`` (model versions),
``ui_signins``, ``corrections`` (the right labels owners marked on jobs) and
``webhooks`` (the outbox of job events, its claims and attempts).
Callers use ``from core import store; store.create_job(...)``.
"""

from __future__ import annotations

from core.store.blobs import get_blob, put_blob
from core.store.db import db_time, ping, unreachable
from core.store.idempotency import get_idempotency, put_idempotency
from core.store.jobs import (
    cancel_job,
    cancelled_among,
    create_job,
    create_jobs,
    decode_cursor,
    encode_cursor,
    get_job,
    get_prediction,
    job_states,
    job_statuses,
    jobs_by_id,
    list_jobs,
    mark_sent,
    prediction_summaries,
    predictions_by_id,
    queued_among,
    stale_queued,
    wait_statuses,
)
from core.store.leases import (
    drop_lease,
    forget_dead_leases,
    live_workers,
    orphaned_running,
    renew_lease,
    requeue_orphans,
)
from core.store.runs import (
    DEFAULT_LEASE,
    RUN_COLUMNS,
    fail_job,
    finish_jobs,
    release_jobs,
    start_jobs,
)
from core.store.stats import (
    cancelled_while_running,
    count_by_owner,
    count_by_status,
    finished_since,
    finished_within,
    latest_failures,
    latest_transcripts,
    live_workers_by_modality,
    oldest_active,
    succeeded_within,
)
from core.store.tables import (
    ACTIVE,
    BASE_VERSION,
    Base,
    Blob,
    Correction,
    IdempotencyKey,
    Job,
    ModelVersion,
    Prediction,
    VersionStatus,
    WebhookAttempt,
    WebhookDelivery,
    WorkerLease,
    db_now,
    make_engine,
    session_factory,
    utcnow,
)
from core.store.webhooks import (
    claim_due,
    enqueue_webhooks,
    job_webhooks,
    record_attempt,
    webhook_counts,
    webhook_id,
)

__all__ = [
    "ACTIVE", "BASE_VERSION", "Base", "Blob", "Correction", "DEFAULT_LEASE",
    "IdempotencyKey", "Job", "ModelVersion", "Prediction", "RUN_COLUMNS", "VersionStatus",
    "WorkerLease",
    "cancel_job", "cancelled_among", "cancelled_while_running", "count_by_owner",
    "count_by_status", "create_job", "create_jobs",
    "db_now", "db_time", "decode_cursor", "drop_lease", "encode_cursor", "fail_job",
    "finish_jobs", "finished_since", "finished_within", "forget_dead_leases", "get_blob",
    "get_idempotency",
    "get_job", "get_prediction", "job_states", "job_statuses", "jobs_by_id",
    "latest_failures", "latest_transcripts", "list_jobs", "live_workers",
    "live_workers_by_modality", "make_engine", "mark_sent",
    "oldest_active", "orphaned_running", "ping", "prediction_summaries", "predictions_by_id",
    "put_blob",
    "put_idempotency",
    "queued_among", "release_jobs", "renew_lease", "requeue_orphans", "session_factory",
    "stale_queued", "start_jobs", "succeeded_within", "unreachable", "utcnow",
    "wait_statuses", "WebhookAttempt", "WebhookDelivery", "claim_due", "enqueue_webhooks",
    "job_webhooks", "record_attempt", "webhook_counts", "webhook_id",
]
