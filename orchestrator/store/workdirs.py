"""The store's verbs for job working directories (table `workdirs`, orchestrator.workdir): put
an archive once under its sha256, tell whether one exists, read it back for an agent.

A module of its own, mixed into Store like the lease verbs, so the archive handling stays out of
the job and attempt code. Archives are written once and never change, so a second upload of the
same sha256 (another replica, a retried submit) is a no-op rather than a conflict.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from orchestrator.store.tables import WorkdirRow


class WorkdirStore:
    """Mixed into Store, which provides the sessions."""

    _write: Callable[[], Session]
    _session: Callable[[], Session]

    def put_workdir(self, sha256: str, data: bytes, unpacked_size: int, now: float | None = None) -> bool:
        """Store an archive already checked against its sha256; False when it was there already."""
        with self._write() as s:
            if s.get(WorkdirRow, sha256) is not None:
                return False
            try:
                s.execute(insert(WorkdirRow).values(sha256=sha256, size=len(data), unpacked_size=unpacked_size,
                                                    data=data, created_at=now or time.time()))
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
