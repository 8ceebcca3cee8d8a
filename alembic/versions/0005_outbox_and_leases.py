"""images.publish_after (the outbox mark) and the leases table (the reconciler's leader lease)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa



# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('images') as batch:
        batch.add_column(sa.Column('publish_after', sa.DateTime(timezone=True), nullable=True))
        batch.create_index('ix_images_publish_after', ['publish_after'], unique=False)
    op.create_table(
        'leases',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('holder', sa.String(length=255), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_leases')),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('leases')
    with op.batch_alter_table('images') as batch:
        batch.drop_index('ix_images_publish_after')
        batch.drop_column('publish_after')
