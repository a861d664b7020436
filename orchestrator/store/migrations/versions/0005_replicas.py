"""several daemons on one database: a row per replica (its lease: epoch and expiry, renewed by
heartbeat), the secrets every replica must share, and an index for each replica's own jobs

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'replicas',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('epoch', sa.Integer(), nullable=False),
        sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=False),
        sa.Column('heartbeat_at', sa.Float(), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'cluster_secrets',
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('value', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_index('ix_jobs_lease_owner', 'jobs', ['lease_owner'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_lease_owner', table_name='jobs')
    op.drop_table('cluster_secrets')
    op.drop_table('replicas')
