"""a change feed on jobs and attempts: every insert and update stamps the row with a position the
reconcile tick can ask "what changed since" about

Revision ID: 0009
Revises: 0008

Row versions (0003) let the tick skip loading unchanged rows, but it still read the (id,
version) pair of every active row each second: at 10,000 queued jobs that scan, and the pass
over every job after it, were most of an idle daemon's CPU and the API's tail latency (issue 9).
With `changed`, the tick reads only rows stamped since its last read (store/feed.py).

The stamp must order commits, or a reader could step past a row committed late:
- PostgreSQL: the writing transaction's id (`txid_current()`). A reader takes the oldest
  transaction still running (`txid_snapshot_xmin`) as its next horizon: whatever it could not
  see yet carries an id at or above that.
- SQLite: writers take turns (one write transaction at a time), so a counter bumped by each
  stamping trigger orders commits; the next horizon is the counter + 1.

Deleting an attempt (a launch every provider refused) touches its job, so a reader learns of it.
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

TABLES = ("jobs", "attempts")


def upgrade() -> None:
    # SQLite's commit-order counter (one row); PostgreSQL has the table but stamps with txids
    op.create_table('gpuhop_changes', sa.Column('n', sa.BigInteger(), nullable=False), sa.PrimaryKeyConstraint('n'))
    op.execute("INSERT INTO gpuhop_changes (n) VALUES (0)")
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('changed', sa.BigInteger(), nullable=False, server_default='0'))
            batch_op.create_index(f'ix_{table}_changed', ['changed'], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE OR REPLACE FUNCTION gpuhop_stamp_change() RETURNS trigger AS $$ "
                   "BEGIN NEW.changed := txid_current(); RETURN NEW; END $$ LANGUAGE plpgsql")
        op.execute("CREATE OR REPLACE FUNCTION gpuhop_touch_job() RETURNS trigger AS $$ "
                   "BEGIN UPDATE jobs SET updated_at = updated_at WHERE id = OLD.job_id; RETURN OLD; END $$ "
                   "LANGUAGE plpgsql")
        for table in TABLES:
            op.execute(f"CREATE TRIGGER {table}_changed BEFORE INSERT OR UPDATE ON {table} "
                       "FOR EACH ROW EXECUTE FUNCTION gpuhop_stamp_change()")
        op.execute("CREATE TRIGGER attempts_deleted AFTER DELETE ON attempts "
                   "FOR EACH ROW EXECUTE FUNCTION gpuhop_touch_job()")
        return
    for table in TABLES:
        # 0003's version trigger, now stamping too; its own update does not fire it again (the
        # WHEN sees the version moved), nor does the insert trigger's (it moves the stamp only,
        # so a new row keeps version 0, as on PostgreSQL)
        op.execute(f"DROP TRIGGER IF EXISTS {table}_version")
        op.execute(f"CREATE TRIGGER {table}_version AFTER UPDATE ON {table} FOR EACH ROW "
                   f"WHEN NEW.version = OLD.version AND NEW.changed = OLD.changed BEGIN "
                   f"UPDATE gpuhop_changes SET n = n + 1; "
                   f"UPDATE {table} SET version = OLD.version + 1, changed = (SELECT n FROM gpuhop_changes) "
                   f"WHERE rowid = NEW.rowid; END")
        op.execute(f"CREATE TRIGGER {table}_inserted AFTER INSERT ON {table} FOR EACH ROW BEGIN "
                   f"UPDATE gpuhop_changes SET n = n + 1; "
                   f"UPDATE {table} SET changed = (SELECT n FROM gpuhop_changes) WHERE rowid = NEW.rowid; END")
    op.execute("CREATE TRIGGER attempts_deleted AFTER DELETE ON attempts FOR EACH ROW BEGIN "
               "UPDATE jobs SET updated_at = updated_at WHERE id = OLD.job_id; END")


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.execute("DROP TRIGGER IF EXISTS attempts_deleted" + (" ON attempts" if pg else ""))
    for table in TABLES:
        if pg:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_changed ON {table}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_inserted")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_version")
            op.execute(f"CREATE TRIGGER {table}_version AFTER UPDATE ON {table} FOR EACH ROW "
                       f"WHEN NEW.version = OLD.version BEGIN "
                       f"UPDATE {table} SET version = OLD.version + 1 WHERE rowid = NEW.rowid; END")
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_changed')
            batch_op.drop_column('changed')
    if pg:
        op.execute("DROP FUNCTION IF EXISTS gpuhop_touch_job()")
        op.execute("DROP FUNCTION IF EXISTS gpuhop_stamp_change()")
    op.drop_table('gpuhop_changes')
