"""one unfinished job per volume, attempt billing columns, coalesced events, preemption aggregate

Revision ID: 0002
Revises: 0001

The volume rule becomes a partial unique index. A database written by 0001 may already hold two
unfinished jobs on one volume (the race this revision closes); the index could not be built over
them, so every such job but the oldest gives up its claim (jobs.volume_name, which only the
listing reads: the engine attaches the volume named in the spec, so those jobs run on as they
were) and gets an event saying so.
"""
import time

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# frozen copies of the model's values: a migration must not change when the code does
TERMINAL = "('succeeded', 'failed', 'cancelled')"
ACTIVE_VOLUME_WHERE = f"volume_name IS NOT NULL AND status NOT IN {TERMINAL}"


def upgrade() -> None:
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bill_started_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('bill_ended_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('cost_final', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('duplicate_cost_usd', sa.Float(), nullable=False, server_default='0'))

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('repeats', sa.Integer(), nullable=False, server_default='0'))
        batch_op.create_index(batch_op.f('ix_events_at'), ['at'], unique=False)

    op.create_table('preemption_stats',
    sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('capacity', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('preemptions', sa.Integer(), nullable=False),
    sa.Column('hours', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('provider', 'capacity')
    )
    start = "COALESCE(running_at, launched_at)"
    op.execute(
        "INSERT INTO preemption_stats (provider, capacity, preemptions, hours) "
        "SELECT provider, capacity, SUM(CASE WHEN end_reason = 'preempted' THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN ended_at > {start} THEN ended_at - {start} ELSE 0 END) / 3600.0 "
        "FROM attempts WHERE status = 'ended' AND launched_at IS NOT NULL GROUP BY provider, capacity"
    )

    conn = op.get_bind()
    rows = conn.execute(sa.text(
        f"SELECT id, volume_name FROM jobs WHERE {ACTIVE_VOLUME_WHERE} ORDER BY created_at, id"
    )).all()
    holder: dict[str, str] = {}
    now = time.time()
    for job_id, volume in rows:
        if volume not in holder:
            holder[volume] = job_id
            continue
        conn.execute(sa.text("UPDATE jobs SET volume_name = NULL WHERE id = :id"), {"id": job_id})
        conn.execute(
            sa.text("INSERT INTO events (job_id, attempt, at, kind, message, repeats) "
                    "VALUES (:id, NULL, :at, 'volume_shared', :msg, 0)"),
            {"id": job_id, "at": now, "msg": f"volume {volume!r} is also claimed by the older job {holder[volume]}; "
             "this job keeps using it but no longer holds it (upgrade to schema 0002)"},
        )
    op.create_index('uq_jobs_active_volume', 'jobs', ['volume_name'], unique=True,
                    sqlite_where=sa.text(ACTIVE_VOLUME_WHERE), postgresql_where=sa.text(ACTIVE_VOLUME_WHERE))


def downgrade() -> None:
    op.drop_index('uq_jobs_active_volume', table_name='jobs')
    op.drop_table('preemption_stats')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_at'))
        batch_op.drop_column('repeats')
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_column('duplicate_cost_usd')
        batch_op.drop_column('cost_final')
        batch_op.drop_column('bill_ended_at')
        batch_op.drop_column('bill_started_at')
