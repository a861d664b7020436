"""The reconcile tick's read cache: every active job and its attempts, re-read each tick, come
from here when their row has not changed since the last tick.

Each tick still asks the database which rows exist and at which version (a cheap read of two
integers per row, no ORM objects), then loads only the rows that are new or whose version moved.
Versions are bumped by a database trigger on every UPDATE (migration 0003), so a writer that
forgets cannot exist: whatever changed in the database is re-read, whoever changed it. Building
ORM objects was most of a tick's cost at 10,000 jobs (issue 9).

Rows handed out are shared between ticks: callers read them and never assign to them (all
writes go through the store's verbs, which load their own rows).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import Boolean


class Versioned(Protocol):
    version: int


R = TypeVar("R", bound=Versioned)
K = TypeVar("K", bound=Hashable)


class RowCache(Generic[K, R]):
    """Rows by key, each valid for the version it was loaded at."""

    def __init__(self) -> None:
        self._rows: dict[K, R] = {}
        self._lock = threading.Lock()
        self.loaded = 0  # rows loaded in full so far (for tests and benchmarks)

    def refresh(self, current: Sequence[tuple[K, int]], load: Callable[[list[K]], Iterable[R]],
                key: Callable[[R], K]) -> dict[K, R]:
        """The rows named in `current` ((key, version) as the database has them now), loading
        those missing or older than that version; rows not in `current` are forgotten."""
        with self._lock:
            known = self._rows
            stale = [k for k, v in current if (row := known.get(k)) is None or row.version != v]
        fresh = {key(r): r for r in load(stale)} if stale else {}
        out: dict[K, R] = {}
        for k, _ in current:
            row = fresh.get(k)
            if row is None:
                row = known.get(k)
            if row is not None:  # None: deleted between the two reads; gone next time too
                out[k] = row
        with self._lock:
            self._rows = out
            self.loaded += len(fresh)
        return out


class PlainRows:
    """Read-only copies of a table's rows as plain slotted objects, loaded through the driver's
    cursor: the tick reads a dozen columns of every active row each pass, and an ORM row's
    instrumented attribute costs ~0.5 µs a read (420,000 reads a tick at 10,000 jobs, issue 9),
    a slot ~30 ns. Same attribute names as the table's model, and `model_dump()`; never handed
    back to a session (the store's verbs load their own rows)."""

    def __init__(self, table: Any) -> None:
        columns = list(table.__table__.columns)
        self.names = [c.name for c in columns]
        self.table = table.__tablename__
        self.columns = ", ".join(self.names)
        bools = {c.name for c in columns if isinstance(c.type, Boolean)}

        def model_dump(row: Any) -> dict[str, Any]:
            return {n: getattr(row, n) for n in self.names}

        self.cls = type(f"Plain{table.__name__}", (), {
            "__slots__": tuple(self.names), "model_dump": model_dump,
            "__repr__": lambda row: f"Plain{table.__name__}({model_dump(row)!r})",
        })
        # one generated function per table assigns every slot from a result tuple (a Python
        # loop of setattr costs several times more, on every reloaded row)
        lines = [f"    o.{n} = None if r[{i}] is None else bool(r[{i}])" if n in bools else f"    o.{n} = r[{i}]"
                 for i, n in enumerate(self.names)]
        code = "def build(r):\n    o = new(cls)\n" + "\n".join(lines) + "\n    return o\n"
        scope: dict[str, Any] = {"new": object.__new__, "cls": self.cls}
        exec(code, scope)  # the code is made from our own column names only
        self.build: Callable[[Sequence[Any]], Any] = scope["build"]

    def load(self, cursor: Any, key: str, keys: Sequence[Any], placeholder: str, chunk: int = 900) -> list[Any]:
        """The rows whose `key` column is in `keys` (900 at a time: every SQLite's limit on bound
        parameters is at least 999)."""
        out: list[Any] = []
        for n in range(0, len(keys), chunk):
            part = keys[n:n + chunk]
            cursor.execute(f"SELECT {self.columns} FROM {self.table} WHERE {key} IN "
                           f"({', '.join([placeholder] * len(part))})", tuple(part))
            out.extend(map(self.build, cursor.fetchall()))
        return out
