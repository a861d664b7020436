"""jobs may move away from their volume (issue 11.2): what a move's transfer cost on the attempt,
a move in progress and a measured checkpoint size on the volume, provider volumes retired by
moves until their provider confirms them gone, and the capacity gaps the expected wait is
learned from

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('transfer_cost_usd', sa.Float(), nullable=True))
    with op.batch_alter_table('volumes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checkpoint_gb', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('move_provider', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch_op.add_column(sa.Column('move_region', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('move_volume_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
        batch_op.add_column(sa.Column('move_attempt', sqlmodel.sql.sqltypes.AutoString(length=96), nullable=True))
    op.create_table(
        'retired_volumes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('volume_name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('region', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('provider_volume_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'capacity_gaps',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('region', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('gpu', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=False),
        sa.Column('ended_at', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_capacity_gaps_started_at'), 'capacity_gaps', ['started_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_capacity_gaps_started_at'), table_name='capacity_gaps')
    op.drop_table('capacity_gaps')
    op.drop_table('retired_volumes')
    with op.batch_alter_table('volumes', schema=None) as batch_op:
        for name in ('move_attempt', 'move_volume_id', 'move_region', 'move_provider', 'checkpoint_gb'):
            batch_op.drop_column(name)
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_column('transfer_cost_usd')
