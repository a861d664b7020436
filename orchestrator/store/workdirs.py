"""The store's verbs for job working directories (table `workdirs`, orchestrator.workdir): put
an archive once under its sha256, tell whether one exists, read it back for an agent, and
delete the old ones no unfinished job names (`prune_workdirs`, from the engine's housekeeping).

A module of its own, mixed into Store like the lease verbs, so the archive handling stays out of
the job and attempt code. Archives are written once and never change, so a second upload of the
same sha256 (another replica, a retried submit) is a no-op rather than a conflict.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import delete, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from orchestrator.store.tables import TERMINAL_JOB_STATUSES, JobRow, WorkdirRow


class WorkdirStore:
    """Mixed into Store, which provides the sessions."""

    _write: Callable[[], Session]
    _session: Callable[[], Session]

    def put_workdir(self, sha256: str, data: bytes, unpacked_size: int, now: float | None = None) -> bool:
        """Store an archive already checked against its sha256; False when it was there already."""
        now = now or time.time()
        with self._write() as s:
            if s.get(WorkdirRow, sha256) is not None:
                # uploaded again for a new job: young again, so pruning does not take it from under it
                s.execute(update(WorkdirRow).where(col(WorkdirRow.sha256) == sha256).values(created_at=now))
                s.commit()
                return False
            try:
                s.execute(insert(WorkdirRow).values(sha256=sha256, size=len(data), unpacked_size=unpacked_size,
                                                    data=data, created_at=now))
                s.commit()
            except IntegrityError:  # another replica stored the same bytes at the same moment
                s.rollback()
                return False
        return True

    def has_workdir(self, sha256: str) -> bool:
        with self._session() as s:
            return s.exec(select(WorkdirRow.sha256).where(WorkdirRow.sha256 == sha256)).first() is not None

    def workdir_data(self, sha256: str) -> bytes | None:
        with self._session() as s:
            data: bytes | None = s.exec(select(WorkdirRow.data).where(WorkdirRow.sha256 == sha256)).first()
            return data

    def prune_workdirs(self, older_than: float) -> int:
        """Delete archives uploaded (or uploaded again) before `older_than` that no unfinished job
        names: a job that has ended is never relaunched, so it needs its archive no more."""
        removed = 0
        with self._write() as s:
            old = list(s.exec(select(WorkdirRow.sha256).where(col(WorkdirRow.created_at) < older_than)))
            for sha in old:
                named = s.exec(select(JobRow.id).where(col(JobRow.status).not_in(TERMINAL_JOB_STATUSES),
                                                       col(JobRow.spec_json).contains(sha)).limit(1)).first()
                if named is None:
                    s.execute(delete(WorkdirRow).where(col(WorkdirRow.sha256) == sha))
                    removed += 1
            s.commit()
        return removed
