"""Transcript segments: an audio prediction's timed segments of speech.

``[[start_s, end_s, text], ...]`` from Whisper's timestamp tokens, what
``/v1/audio/transcriptions`` turns into SRT, WebVTT and verbose JSON.

Revision ID: 0010
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0008"


def upgrade() -> None:
    # NULL for text and image predictions, and for audio predictions stored before
    # segments were decoded.
    op.add_column("predictions", sa.Column("segments", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("predictions", "segments")
