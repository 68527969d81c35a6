"""Idempotency keys for the HTTP API; indexes for listing pages and latency metrics.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        # "<hash of the API key>:<Idempotency-Key>": one client's key never meets another's.
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("job_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # GET /v1/jobs pages newest first; /metrics reads jobs finished since its last scrape.
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])
    op.create_index("ix_jobs_finished", "jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished", "jobs")
    op.drop_index("ix_jobs_created", "jobs")
    op.drop_table("idempotency_keys")
