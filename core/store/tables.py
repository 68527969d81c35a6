"""The store's tables (SQLAlchemy 2.x models) and engine set-up; the functions that
read and write them are in the other modules of core/store/ (re-exported by its
__init__.py), and Alembic's migrations of them in core/store/migrations."""


from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy import (
    text as sql_text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.expression import FunctionElement, literal

from core.jobs import ACTIVE, JobStatus  # noqa: F401  (ACTIVE: the store's name for it too)


def utcnow() -> datetime:
    """This process's wall clock: for display and for the duration a caller asks
    about ("jobs of the last hour"), never for a time that decides anything."""
    return datetime.now(UTC)


class db_now(FunctionElement):  # noqa: N801  (an SQL function, named like one)
    """The database server's clock, ``offset_s`` seconds from now, inside the statement.

    Every time that decides anything (lease expiry, deadlines, sweep ages, the
    started/finished stamps search catches up on) is this one clock: hosts are never
    trusted to agree (a worker 10 min fast cancelled a third of the jobs with
    deadlines, one 10 min slow had its running jobs taken as orphans). PostgreSQL:
    ``clock_timestamp()``, the time at evaluation, not at transaction start (a
    group-commit or sweep transaction may run for a while). SQLite is embedded, one
    host by definition: its own ``strftime('now')``, in the format SQLAlchemy stores
    (microseconds, so that string comparison orders it with stored values)."""

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "db_now"

    def __init__(self, offset_s: float = 0.0):
        super().__init__(literal(float(offset_s), Float))


@compiles(db_now, "postgresql")
def _pg_now(element, compiler, **kw) -> str:
    offset = compiler.process(element.clauses, **kw)
    return f"(clock_timestamp() + make_interval(secs => {offset}))"


@compiles(db_now, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    offset = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%.6f seconds', {offset}))"


class unindexed(FunctionElement):  # noqa: N801  (an SQL expression, named like one)
    """A column that the statement must not look up by an index: ``+column`` on SQLite
    (its documented way to keep a term off every index), ``COALESCE(column, column)``
    on PostgreSQL (the same value, which no index on the column matches).

    For ``id IN (...) AND status = 'queued'``, a planner without statistics (SQLite
    always, as nothing runs ANALYZE; PostgreSQL before autovacuum has analyzed, or
    with statistics from before a burst) takes the status index for selective and
    reads every queued job, not the 16 named: a worker's start of a message's jobs
    cost more the deeper the queue (20x the SQLite steps at 4,000 queued jobs than at
    40), and so did the fenced finish (every running job), the sweep's and the
    lease's checks (every cancelled job ever) and search's reads of stored vectors.
    Statements that pick jobs by id wrap the other columns they test in this, so that
    the primary key is the only index that can serve them."""

    inherit_cache = True
    name = "unindexed"

    def __init__(self, column):
        super().__init__(column)
        self.type = column.type


@compiles(unindexed)
def _coalesced(element, compiler, **kw) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"COALESCE({column}, {column})"


@compiles(unindexed, "sqlite")
def _sqlite_unindexed(element, compiler, **kw) -> str:
    return f"+{compiler.process(element.clauses, **kw)}"


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    modality: Mapped[str] = mapped_column(String(16))
    task: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # labels, top_k
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Last time the task was sent to the broker; requeue re-sends stale queued jobs.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    model_version: Mapped[str | None] = mapped_column(String(255), default=None)
    text: Mapped[str | None] = mapped_column(Text, default=None)  # text payloads, inline
    payload_sha256: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("blobs.sha256"), default=None)  # image/audio bytes
    # The API key id that made the job (never the key); None = SDK/CLI without a key.
    owner: Mapped[str | None] = mapped_column(String(64), default=None)
    # Where to POST the job's event when it ends (core/webhooks/), and whether that
    # event carries the embedding; checked at submit (core/webhooks/urls.py).
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_embedding: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_modality_status", "modality", "status"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_finished", "finished_at"),
        Index("ix_jobs_owner_created", "owner", "created_at", "id"),
        Index("ix_jobs_worker_status", "worker", "status"),
    )

    def as_dict(self) -> dict:
        ts = lambda d: d.isoformat() if d else None  # noqa: E731
        return {
            "id": self.id, "modality": self.modality, "task": self.task,
            "params": self.params or {}, "status": self.status, "attempts": self.attempts,
            "error": self.error, "created_at": ts(self.created_at),
            "started_at": ts(self.started_at), "finished_at": ts(self.finished_at),
            "deadline": ts(self.deadline), "worker": self.worker,
            "model_version": self.model_version, "payload_sha256": self.payload_sha256,
            "owner": self.owner, "webhook_url": self.webhook_url,
        }


class Blob(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Prediction(Base):
    __tablename__ = "predictions"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id"), primary_key=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # float32 LE
    dim: Mapped[int | None] = mapped_column(Integer, default=None)
    # None is SQL NULL (none_as_null), not the JSON text "null": an embed job has no
    # labels and no segments, and encoding None for them cost a json.dumps per column
    # per row of every batch's record.
    labels: Mapped[list | None] = mapped_column(JSON(none_as_null=True),
                                                default=None)  # [[label, score], ...]
    tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    truncated: Mapped[bool | None] = mapped_column(default=None)
    model_version: Mapped[str | None] = mapped_column(String(255), default=None)
    text: Mapped[str | None] = mapped_column(Text, default=None)  # audio: the transcript
    # audio: [[start s, end s, text], ...] from Whisper's timestamp tokens (migration 0010)
    segments: Mapped[list | None] = mapped_column(JSON(none_as_null=True), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def vector(self) -> np.ndarray | None:
        if self.embedding is None:
            return None
        return np.frombuffer(self.embedding, dtype="<f4")

    def as_dict(self, with_embedding: bool = True) -> dict:
        out = {"labels": self.labels, "dim": self.dim, "tokens": self.tokens,
               "truncated": self.truncated, "model_version": self.model_version,
               "text": self.text, "segments": self.segments}
        if with_embedding and self.embedding is not None:
            out["embedding"] = self.vector().tolist()
        return out


class WorkerLease(Base):
    """A live worker process: renewed every ``lease_renew_s``; a worker whose lease is
    older than ``lease_s`` is dead, and the sweep recovers its running jobs."""

    __tablename__ = "worker_leases"

    worker: Mapped[str] = mapped_column(String(255), primary_key=True)
    modality: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_worker_leases_heartbeat", "heartbeat_at"),)


class VersionStatus(str, Enum):
    CANDIDATE = "candidate"
    """Trained and recorded; jobs run it only when they name it."""
    PROMOTED = "promoted"
    """The default for jobs of its modality that name no version (at most one)."""
    RETIRED = "retired"
    """Was promoted, then replaced or rolled back; jobs may still name it."""


# The version name that means the frozen pretrained tower, with no adapter.
BASE_VERSION = "base"


class ModelVersion(Base):
    """A fine-tuned adapter on a frozen tower (core/model/adapters.py)."""

    __tablename__ = "model_versions"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    modality: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(255))  # MultimodalModel.version trained on
    data_digest: Mapped[str] = mapped_column(String(64))  # sha256 over (label, file sha256)
    metrics: Mapped[dict] = mapped_column(JSON)  # held-out accuracy, per class, confusions
    config: Mapped[dict] = mapped_column(JSON)  # adapter and training configs, seed
    adapter_file: Mapped[str] = mapped_column(String(300))  # under MMQ_ADAPTERS_DIR
    adapter_sha256: Mapped[str] = mapped_column(String(64))  # checked at every load
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.CANDIDATE.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    __table_args__ = (
        Index("ix_model_versions_modality", "modality", "status"),
        Index("ux_model_versions_promoted", "modality", unique=True,
              sqlite_where=sql_text("status = 'promoted'"),
              postgresql_where=sql_text("status = 'promoted'")),
    )

    def as_dict(self, with_metrics: bool = True) -> dict:
        ts = lambda d: d.isoformat() if d else None  # noqa: E731
        out = {"name": self.name, "modality": self.modality, "status": self.status,
               "base_model": self.base_model, "data_digest": self.data_digest,
               "adapter_sha256": self.adapter_sha256, "created_at": ts(self.created_at),
               "promoted_at": ts(self.promoted_at),
               "accuracy": (self.metrics or {}).get("accuracy"),
               # How many corrections it was trained from (None: from a folder).
               "corrections": ((self.config or {}).get("corrections") or {}).get("count"),
               # the pretrained tower on the same held-out items (None: trained before
               # versions were compared with their base)
               "base_accuracy": (self.metrics or {}).get("base_accuracy")}
        if with_metrics:
            out |= {"metrics": self.metrics, "config": self.config,
                    "adapter_file": self.adapter_file}
        return out


class IdempotencyKey(Base):
    """A submit's Idempotency-Key, the hash of its request and the jobs it created."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_ids: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """The outbox: one row per ended job that has a webhook_url, written in the
    transaction that ends the job (core/store/runs.py, jobs.py's cancel), so an event
    is never lost nor made for an outcome that was rolled back. ``id`` is the event's
    ``webhook-id``, the same on every retry. A delivery thread claims due rows
    (``next_at``, ``lease_until``: the database's clock) and records each attempt."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "msg_" + job id
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id"))
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | ...
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                         default=None)
    claim: Mapped[str | None] = mapped_column(String(36), default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                          default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_at"),
        Index("ix_webhook_deliveries_job", "job_id"),
    )


class WebhookAttempt(Base):
    """One POST of a delivery: when, the HTTP status (None: no answer) and the error."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(64), ForeignKey("webhook_deliveries.id"))
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "number"),)


class UiSignin(Base):
    """A live sign-in to the results page (producer/ui/session.py): its cookie is
    good only while this row exists and has not expired. Sign-out deletes it, so a
    replayed cookie is refused by every API process on every host. ``expires_at`` is
    the database server's clock (core/store/ui_signins.py), never an API host's."""

    __tablename__ = "ui_signins"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_ui_signins_expires", "expires_at"),)


class Correction(Base):
    """The right label of a finished classify job, as its owner marked it on the results
    page, the API or the SDK: training data for ``mmq train --from-corrections``
    (core/store/corrections.py). One row per job: a new correction replaces the old
    (the latest word wins; who and when are of that latest one)."""

    __tablename__ = "corrections"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    label: Mapped[str] = mapped_column(String(255))  # label_text form (stripped, NFC)
    predicted: Mapped[str | None] = mapped_column(String(255), default=None)  # top label then
    corrected_by: Mapped[str] = mapped_column(String(64))  # a key id, or the SDK's "by"
    via: Mapped[str] = mapped_column(String(8))  # "ui", "api" or "sdk"
    # The database server's clock (db_now), never a producer host's.
    corrected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_corrections_corrected", "corrected_at"),)

    def as_dict(self) -> dict:
        at = self.corrected_at
        at = at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at
        return {"job_id": self.job_id, "label": self.label, "predicted": self.predicted,
                "corrected_by": self.corrected_by, "via": self.via,
                "corrected_at": at.isoformat() if at else None}


# -- engine ---------------------------------------------------------------------------

def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record) -> None:
            # WAL: readers never block the writer; busy_timeout: writers from several
            # processes queue instead of failing with "database is locked".
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # A client that vanished mid-transaction (its host's link cut: no reset reaches the
    # server) kept its row locks until TCP gave up, minutes later, and the sweep's
    # UPDATE of its jobs waited for it: bench/cluster.py's link cut recovered only when
    # the link came back (60.6 s). mmq never idles inside a transaction for more than
    # moments, so the server ends such a session (and its locks) after this long.
    options = f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_S * 1000}"
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         connect_args={"options": options})


PG_IDLE_IN_TRANSACTION_S = 30


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


