"""Alembic environment: runs on the connection the daemon hands it (see store.db.migrate)."""

from alembic import context
from sqlmodel import SQLModel

from orchestrator.store import tables  # noqa: F401 - registers the tables on the metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through orchestrator.store.db.migrate()")
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
