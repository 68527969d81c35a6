"""Transcripts: an audio job's prediction carries the text of what was said.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    # NULL for text and image predictions, and for audio predictions stored before
    # the speech tower (the keyword tower had no transcript).
    op.add_column("predictions", sa.Column("text", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("predictions", "text")
