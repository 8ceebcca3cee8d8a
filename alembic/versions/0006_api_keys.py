"""api_keys and api_jobs (farm api: keys stored hashed, job ownership, webhook delivery state)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('key_hash', sa.String(length=64), nullable=False),
        sa.Column('prefix', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('rate', sa.Float(), nullable=True),
        sa.Column('concurrency', sa.Integer(), nullable=True),
        sa.Column('webhook_secret', sa.String(length=64), nullable=False),
        sa.Column('options', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash')),
        sa.UniqueConstraint('name', name=op.f('uq_api_keys_name')),
    )
    op.create_table(
        'api_jobs',
        sa.Column('submission_id', sa.String(length=36), nullable=False),
        sa.Column('key_id', sa.String(length=36), nullable=True),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('request', sa.JSON(), nullable=False),
        sa.Column('callback_url', sa.Text(), nullable=True),
        sa.Column('webhook_state', sa.String(length=16), nullable=True),
        sa.Column('webhook_attempts', sa.Integer(), nullable=False),
        sa.Column('webhook_next_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('webhook_error', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_api_jobs_key_id_api_keys'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['submission_id'], ['submissions.id'], name=op.f('fk_api_jobs_submission_id_submissions'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('submission_id', name=op.f('pk_api_jobs')),
    )
    with op.batch_alter_table('api_jobs') as batch:
        batch.create_index('ix_api_jobs_key_id', ['key_id'], unique=False)
        batch.create_index('ix_api_jobs_webhook_state', ['webhook_state'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('api_jobs')
    op.drop_table('api_keys')
