"""Model versions: fine-tuned adapters on the frozen towers, and which one serves.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("modality", sa.String(16), nullable=False),
        # The frozen tower it was trained on (MultimodalModel.version) and its features.
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.Column("data_digest", sa.String(64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        # A file name under MMQ_ADAPTERS_DIR, and the sha256 checked at every load.
        sa.Column("adapter_file", sa.String(300), nullable=False),
        sa.Column("adapter_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        # Set by promote, cleared by the rollback that undoes it: rollback goes back to
        # the version promoted most recently before.
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_model_versions_modality", "model_versions", ["modality", "status"])
    # At most one promoted version per modality, whatever two admins do at once.
    op.create_index("ux_model_versions_promoted", "model_versions", ["modality"], unique=True,
                    sqlite_where=sa.text("status = 'promoted'"),
                    postgresql_where=sa.text("status = 'promoted'"))


def downgrade() -> None:
    op.drop_index("ux_model_versions_promoted", "model_versions")
    op.drop_index("ix_model_versions_modality", "model_versions")
    op.drop_table("model_versions")
