"""Persistence: SQLModel tables, the database engine (SQLite WAL or PostgreSQL), Alembic
migrations and the store's verbs."""

from orchestrator.store.errors import Conflict
from orchestrator.store.leases import Fence, LeaseLost
from orchestrator.store.repo import LaunchRecord, Store
from orchestrator.store.tables import AttemptRow, EventRow, JobRow, ReplicaRow, VolumeRow

__all__ = ["AttemptRow", "Conflict", "EventRow", "Fence", "JobRow", "LaunchRecord", "LeaseLost", "ReplicaRow", "Store", "VolumeRow"]
