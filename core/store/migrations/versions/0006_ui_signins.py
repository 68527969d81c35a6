"""Sign-ins to the results page, so that sign-out ends a session on every host.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "ui_signins",
        # The per-sign-in nonce the signed cookie carries (producer/ui/session.py).
        sa.Column("nonce", sa.String(64), primary_key=True),
        # The database server's clock: sign-in time + MMQ_UI_SESSION_S.
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ui_signins_expires", "ui_signins", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_ui_signins_expires", "ui_signins")
    op.drop_table("ui_signins")
