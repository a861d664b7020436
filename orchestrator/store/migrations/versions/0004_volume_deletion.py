"""volumes can be deleted: a claim column pair so a deletion and a submit naming the volume
cannot both win

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('volumes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleting_since', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('deleting_token', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('volumes', schema=None) as batch_op:
        batch_op.drop_column('deleting_token')
        batch_op.drop_column('deleting_since')
