"""Persistence: SQLModel tables, the database engine (SQLite WAL or PostgreSQL), Alembic
migrations and the store's verbs."""

from orchestrator.store.repo import Conflict, Store
from orchestrator.store.tables import AttemptRow, EventRow, JobRow, VolumeRow

__all__ = ["AttemptRow", "Conflict", "EventRow", "JobRow", "Store", "VolumeRow"]
