"""campaigns: named resumable groups of images; paused status; published_at

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

OLD_STATUS = "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')"
NEW_STATUS = "status IN ('queued', 'paused', 'running', 'succeeded', 'failed', 'canceled')"


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.CheckConstraint("state IN ('active', 'paused', 'canceled')", name=op.f("ck_campaigns_state_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("name", name=op.f("uq_campaigns_name")),
    )
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("campaign_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("item_key", sa.String(length=64), nullable=True))
        batch.create_index("ix_images_campaign_item", ["campaign_id", "item_key"], unique=True)
        batch.create_index("ix_images_campaign_status", ["campaign_id", "status"], unique=False)
        batch.create_foreign_key(
            op.f("fk_images_campaign_id_campaigns"), "campaigns", ["campaign_id"], ["id"], ondelete="CASCADE"
        )
        batch.drop_constraint(op.f("ck_images_status_valid"), type_="check")
        batch.create_check_constraint(op.f("ck_images_status_valid"), NEW_STATUS)
    with op.batch_alter_table("submissions") as batch:
        batch.add_column(sa.Column("campaign_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(op.f("ix_submissions_campaign_id"), ["campaign_id"], unique=False)
        batch.create_foreign_key(
            op.f("fk_submissions_campaign_id_campaigns"), "campaigns", ["campaign_id"], ["id"], ondelete="CASCADE"
        )
    # submissions recorded before this revision were published as they were submitted
    op.execute("UPDATE submissions SET published_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table("submissions") as batch:
        batch.drop_constraint(op.f("fk_submissions_campaign_id_campaigns"), type_="foreignkey")
        batch.drop_index(op.f("ix_submissions_campaign_id"))
        batch.drop_column("published_at")
        batch.drop_column("campaign_id")
    op.execute("UPDATE images SET status = 'queued' WHERE status = 'paused'")
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint(op.f("ck_images_status_valid"), type_="check")
        batch.create_check_constraint(op.f("ck_images_status_valid"), OLD_STATUS)
        batch.drop_constraint(op.f("fk_images_campaign_id_campaigns"), type_="foreignkey")
        batch.drop_index("ix_images_campaign_status")
        batch.drop_index("ix_images_campaign_item")
        batch.drop_column("item_key")
        batch.drop_column("campaign_id")
    op.drop_table("campaigns")
