"""Jobs, content-addressed payload blobs and predictions.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("sent_at", TS),
        sa.Column("deadline", TS),
        sa.Column("worker", sa.String(255)),
        sa.Column("model_version", sa.String(255)),
        sa.Column("text", sa.Text()),
        sa.Column("payload_sha256", sa.String(64), sa.ForeignKey("blobs.sha256")),
    )
    op.create_index("ix_jobs_status_created", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_modality_status", "jobs", ["modality", "status"])
    op.create_table(
        "predictions",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("embedding", sa.LargeBinary()),
        sa.Column("dim", sa.Integer()),
        sa.Column("labels", sa.JSON()),
        sa.Column("tokens", sa.Integer()),
        sa.Column("truncated", sa.Boolean()),
        sa.Column("model_version", sa.String(255)),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("predictions")
    op.drop_index("ix_jobs_modality_status", "jobs")
    op.drop_index("ix_jobs_status_created", "jobs")
    op.drop_table("jobs")
    op.drop_table("blobs")
