"""The reconcile tick's view of the active jobs, kept up to date from a change feed.

Every insert and update of a job or an attempt is stamped by the database with a position in
commit order (migration 0009). The first read, and one every RESYNC_SECONDS as a safety net,
reads the whole active set (row versions, loading only rows that moved: store.cache); every
other read asks only for rows stamped at or after the horizon the previous read took, and says
which jobs those were. At 10,000 jobs queued for capacity the full read each second, and the
tick's pass over every job after it, were most of an idle daemon's CPU and the API's tail
latency (issue 9); with the feed a quiet job costs nothing per tick.

What keeps it exact:
- the horizon is taken before the rows are read, so a write committed after it is stamped at
  or above it (PostgreSQL: the oldest transaction still running; SQLite, whose writers take
  turns: the counter's next value) and is read next time, whoever wrote it (another replica, a
  migration, the API);
- a job that enters the set (submitted, claimed by this replica) or whose row changed has its
  attempts listed in full; deleting an attempt touches its job (a trigger), so it counts too;
- a job leaves the set when its row says it ended or belongs to another replica.

Rows handed out are shared with the cache: callers read them and never assign to them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.store.cache import PlainRows, RowCache

RESYNC_SECONDS = 60.0  # a full read this often, whatever the feed says
CHUNK = 900  # bound parameters per IN (...): every SQLite allows at least 999


@dataclass
class ActiveState:
    """Every active job of this replica and its attempts, and what moved since the last read."""

    jobs: dict[str, Any]  # job id -> row, oldest first on a full read, then in arrival order
    attempts: dict[str, list[Any]]  # job id -> its attempts in number order (every job has a list)
    changed: set[str] | None  # jobs whose row or attempts changed since the last read; None: all
    removed: set[str] = field(default_factory=set)  # jobs that left the set since the last read


class ActiveFeed:
    """One replica's active set, read through a change feed (see the module docstring)."""

    def __init__(self, jobs: PlainRows, attempts: PlainRows, active_statuses: Iterable[str]) -> None:
        self._plain_jobs = jobs
        self._plain_attempts = attempts
        self._active = frozenset(active_statuses)
        self._active_sql = "(" + ", ".join(f"'{s}'" for s in sorted(self._active)) + ")"  # our constants
        self._job_cache: RowCache[str, Any] = RowCache()
        self._attempt_cache: RowCache[int, Any] = RowCache()
        self._jobs: dict[str, Any] = {}
        self._attempts: dict[str, list[Any]] = {}
        self._attempt_rows: dict[int, Any] = {}
        self._horizon: int | None = None
        self._owner: str | None = None
        self._full_at = 0.0
        self._lock = threading.Lock()
        self.full_reads = 0  # for tests and benchmarks
        self.rows_loaded = 0

    def invalidate(self) -> None:
        """Make the next read a full one."""
        with self._lock:
            self._horizon = None

    def read(self, cursor: Any, placeholder: str, sqlite: bool, owner: str | None,
             now: float | None = None) -> ActiveState:
        now = time.monotonic() if now is None else now
        with self._lock:
            cursor.execute("SELECT n + 1 FROM gpuhop_changes" if sqlite
                           else "SELECT txid_snapshot_xmin(txid_current_snapshot())")
            horizon = int(cursor.fetchone()[0])
            if self._horizon is None or owner != self._owner or now - self._full_at >= RESYNC_SECONDS:
                state = self._full(cursor, placeholder, owner)
                self._full_at, self._owner = now, owner
            else:
                state = self._since(cursor, placeholder, owner, self._horizon)
            self._horizon = horizon
            return state

    # ------------------------------------------------------------------ reads

    def _full(self, cursor: Any, ph: str, owner: str | None) -> ActiveState:
        mine = "" if owner is None else f" AND lease_owner = {ph}"
        args = () if owner is None else (owner,)
        cursor.execute(f"SELECT id, version FROM jobs WHERE status IN {self._active_sql}{mine}", args)
        job_versions = [(str(i), int(v)) for i, v in cursor.fetchall()]
        before = self._job_cache.loaded + self._attempt_cache.loaded
        jobs = self._job_cache.refresh(
            job_versions, lambda keys: self._plain_jobs.load(cursor, "id", keys, ph), lambda r: r.id)
        # joined, not `job_id IN (10,000 ids)`: expanding that list cost more than the read
        joined_mine = "" if owner is None else f" AND j.lease_owner = {ph}"
        cursor.execute("SELECT a.id, a.version FROM attempts a JOIN jobs j ON j.id = a.job_id "
                       f"WHERE j.status IN {self._active_sql}{joined_mine}", args)
        attempt_versions = [(int(i), int(v)) for i, v in cursor.fetchall()]
        attempts = self._attempt_cache.refresh(
            attempt_versions, lambda keys: self._plain_attempts.load(cursor, "id", keys, ph), lambda r: r.id or 0)
        self.rows_loaded += self._job_cache.loaded + self._attempt_cache.loaded - before
        by_job: dict[str, list[Any]] = {j: [] for j in jobs}
        for row in attempts.values():
            if row.job_id in by_job:
                by_job[row.job_id].append(row)
        for rows in by_job.values():
            rows.sort(key=lambda r: r.number)
        self._jobs, self._attempts, self._attempt_rows = dict(jobs), by_job, dict(attempts)
        self.full_reads += 1
        return ActiveState(self._jobs, self._attempts, None)

    def _since(self, cursor: Any, ph: str, owner: str | None, horizon: int) -> ActiveState:
        jobs, attempts, attempt_rows = self._jobs, self._attempts, self._attempt_rows
        cursor.execute(f"SELECT id, version, status, lease_owner FROM jobs WHERE changed >= {ph}", (horizon,))
        stale_jobs: list[str] = []
        removed: set[str] = set()
        for raw_id, version, status, lease_owner in cursor.fetchall():
            job_id = str(raw_id)
            if status not in self._active or (owner is not None and lease_owner != owner):
                if job_id in jobs:
                    removed.add(job_id)
                continue
            row = jobs.get(job_id)
            if row is None or row.version != int(version):
                stale_jobs.append(job_id)
        cursor.execute(f"SELECT id, version, job_id FROM attempts WHERE changed >= {ph}", (horizon,))
        moved_attempts = [(int(i), int(v), str(j)) for i, v, j in cursor.fetchall()]

        for row in self._plain_jobs.load(cursor, "id", stale_jobs, ph) if stale_jobs else []:
            # read after the feed, so it may be newer still: its own status and owner decide
            if row.status not in self._active or (owner is not None and row.lease_owner != owner):
                if row.id in jobs:
                    removed.add(row.id)
                continue
            jobs[row.id] = row
            removed.discard(row.id)
        for job_id in removed:
            jobs.pop(job_id, None)
            for row in attempts.pop(job_id, []):
                attempt_rows.pop(row.id or 0, None)
        self.rows_loaded += len(stale_jobs)

        # which attempts each touched job has now: listed in full for jobs whose row moved (new
        # ones, and those that lost an attempt), from the feed for the others
        members: dict[str, dict[int, int]] = {}
        relisted = [j for j in stale_jobs if j in jobs]
        for n in range(0, len(relisted), CHUNK):
            part = relisted[n:n + CHUNK]
            cursor.execute(f"SELECT id, version, job_id FROM attempts WHERE job_id IN "
                           f"({', '.join([ph] * len(part))})", tuple(part))
            for i, v, j in cursor.fetchall():
                members.setdefault(str(j), {})[int(i)] = int(v)
        for job_id in relisted:
            members.setdefault(job_id, {})
        for attempt_id, version, job_id in moved_attempts:
            if job_id in jobs and job_id not in members:
                known = {r.id or 0: r.version for r in attempts.get(job_id, [])}
                members[job_id] = known
            if job_id in members and job_id not in relisted:
                members[job_id][attempt_id] = version
        to_load = [i for ids in members.values() for i, v in ids.items()
                   if (row := attempt_rows.get(i)) is None or row.version != v]
        for row in self._plain_attempts.load(cursor, "id", to_load, ph) if to_load else []:
            attempt_rows[row.id or 0] = row
        self.rows_loaded += len(to_load)
        changed: set[str] = set()
        for job_id, ids in members.items():
            old = attempts.get(job_id, [])
            rows = [attempt_rows[i] for i in ids if i in attempt_rows]
            for row in old:
                if (row.id or 0) not in ids:
                    attempt_rows.pop(row.id or 0, None)
            rows.sort(key=lambda r: r.number)
            if job_id in relisted or len(rows) != len(old) or any(a is not b for a, b in zip(rows, old, strict=True)):
                attempts[job_id] = rows
                changed.add(job_id)
        return ActiveState(jobs, attempts, changed, removed)
