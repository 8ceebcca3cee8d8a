"""safety verdicts, embeddings, api campaigns, training jobs

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


STATUSES = "status IN ('queued', 'paused', 'running', 'succeeded', 'failed', 'canceled'{})"


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('embeddings',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('vectors', sa.Integer(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('storage_key', sa.String(length=1024), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_embeddings')),
    sa.UniqueConstraint('name', name=op.f('uq_embeddings_name'))
    )
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_embeddings_sha256'), ['sha256'], unique=False)

    op.create_table('training_jobs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('total_steps', sa.Integer(), nullable=False),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.Column('checkpoint_key', sa.String(length=1024), nullable=True),
    sa.Column('checkpoint_step', sa.Integer(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('claim_token', sa.String(length=36), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('publish_after', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('info', sa.JSON(), nullable=True),
    sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')", name=op.f('ck_training_jobs_state_valid')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_jobs')),
    sa.UniqueConstraint('name', name=op.f('uq_training_jobs_name'))
    )
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_jobs_publish_after'), ['publish_after'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_jobs_state'), ['state'], unique=False)

    op.create_table('api_campaigns',
    sa.Column('campaign_id', sa.String(length=36), nullable=False),
    sa.Column('key_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_api_campaigns_campaign_id_campaigns'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_api_campaigns_key_id_api_keys'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('campaign_id', name=op.f('pk_api_campaigns'))
    )
    with op.batch_alter_table('api_campaigns', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_campaigns_key_id'), ['key_id'], unique=False)

    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('flagged', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('safety', sa.JSON(), nullable=True))
        batch_op.drop_constraint(op.f('ck_images_status_valid'), type_='check')
        batch_op.create_check_constraint('status_valid', STATUSES.format(", 'filtered'"))



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_column('safety')
        batch_op.drop_constraint(op.f('ck_images_status_valid'), type_='check')
        batch_op.create_check_constraint('status_valid', STATUSES.format(""))
        batch_op.drop_column('flagged')

    with op.batch_alter_table('api_campaigns', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_campaigns_key_id'))

    op.drop_table('api_campaigns')
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_training_jobs_publish_after'))

    op.drop_table('training_jobs')
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_embeddings_sha256'))

    op.drop_table('embeddings')
