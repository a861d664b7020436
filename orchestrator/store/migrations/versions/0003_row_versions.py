"""row versions on jobs and attempts, bumped by the database on every update

Revision ID: 0003
Revises: 0002

The reconcile tick re-reads every active job and its attempts each pass. With a version that
the database itself bumps on every UPDATE (a trigger, so no writer can forget it), the store
reads only (id, version) pairs and fetches the rows that changed; unchanged ones come from its
cache. The trigger, not the application, is what makes that cache safe.
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

TABLES = ("jobs", "attempts")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('version', sa.Integer(), nullable=False, server_default='0'))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE OR REPLACE FUNCTION gpuhop_bump_version() RETURNS trigger AS $$ "
                   "BEGIN NEW.version := OLD.version + 1; RETURN NEW; END $$ LANGUAGE plpgsql")
        for table in TABLES:
            op.execute(f"CREATE TRIGGER {table}_version BEFORE UPDATE ON {table} "
                       "FOR EACH ROW EXECUTE FUNCTION gpuhop_bump_version()")
    else:  # SQLite: after the update, once (the WHEN stops it from firing on its own update)
        for table in TABLES:
            op.execute(f"CREATE TRIGGER {table}_version AFTER UPDATE ON {table} FOR EACH ROW "
                       f"WHEN NEW.version = OLD.version BEGIN "
                       f"UPDATE {table} SET version = OLD.version + 1 WHERE rowid = NEW.rowid; END")


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_version" + (f" ON {table}" if op.get_bind().dialect.name == "postgresql" else ""))
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('version')
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS gpuhop_bump_version()")
