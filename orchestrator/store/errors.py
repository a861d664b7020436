"""The store's refusals, in a module of their own so every store module can raise them."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite


class Conflict(Exception):
    """The write contradicts the current state (e.g. a volume already in use). `code` names the
    kind for API clients (the message says it in words)."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


def upsert(dialect: str, table: type[Any]) -> Any:
    """INSERT with ON CONFLICT support (both dialects spell it alike)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
