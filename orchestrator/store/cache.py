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
from typing import Generic, Protocol, TypeVar


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
