"""Corrections: the right label of a finished classify job, marked by its owner.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "corrections",
        # One row per job: a new correction replaces the old one.
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("label", sa.String(255), nullable=False),
        # The job's top label when it was corrected (what the model said).
        sa.Column("predicted", sa.String(255), nullable=True),
        # Who: the API key id (page or API), or what the SDK caller named.
        sa.Column("corrected_by", sa.String(64), nullable=False),
        sa.Column("via", sa.String(8), nullable=False),
        # When: the database server's clock.
        sa.Column("corrected_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_corrections_corrected", "corrections", ["corrected_at"])


def downgrade() -> None:
    op.drop_index("ix_corrections_corrected", "corrections")
    op.drop_table("corrections")
