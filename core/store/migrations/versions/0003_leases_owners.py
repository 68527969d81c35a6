"""Worker leases (a running job is recovered when its worker's lease expires) and job
owners (a job belongs to the API key that made it).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "worker_leases",
        # The Celery node name, "<modality>-<pid>@<host>": unique per worker process.
        sa.Column("worker", sa.String(255), primary_key=True),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        # Renewed by the worker every few seconds; past its lease the worker is dead.
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_worker_leases_heartbeat", "worker_leases", ["heartbeat_at"])
    # A key id (a name or a hash prefix of the key), never the key itself. NULL: made
    # by the SDK or CLI without a key; only admin keys see those through the API.
    op.add_column("jobs", sa.Column("owner", sa.String(64), nullable=True))
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", "created_at", "id"])
    # The sweep looks up running jobs by the worker that took them.
    op.create_index("ix_jobs_worker_status", "jobs", ["worker", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_worker_status", "jobs")
    op.drop_index("ix_jobs_owner_created", "jobs")
    op.drop_column("jobs", "owner")
    op.drop_index("ix_worker_leases_heartbeat", "worker_leases")
    op.drop_table("worker_leases")
