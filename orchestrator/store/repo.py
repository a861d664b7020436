"""The store's verbs: every read and write the API and the engine make, each its own short
transaction, so that every transition is committed before the next step relies on it.

Methods are synchronous (SQLAlchemy sessions); async callers run them with `Store.run`, which
moves the call to a worker thread so a slow database never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from orchestrator.models import AttemptStatus, EndReason, JobSpec, JobStatus
from orchestrator.store.db import make_engine, migrate
from orchestrator.store.tables import AttemptRow, EventRow, JobRow, VolumeRow

P = ParamSpec("P")
T = TypeVar("T")

ACTIVE_STATUSES = [s.value for s in JobStatus if not s.terminal]


class Conflict(Exception):
    """The write contradicts the current state (e.g. a volume already in use)."""


class Store:
    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)

    def migrate(self) -> None:
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------------ jobs

    def create_job(self, job_id: str, spec: JobSpec, now: float | None = None) -> JobRow:
        now = now or time.time()
        with self._session() as s:
            if spec.volume is not None:
                busy = s.exec(
                    select(JobRow).where(
                        JobRow.volume_name == spec.volume.name, col(JobRow.status).in_(ACTIVE_STATUSES)
                    )
                ).first()
                if busy is not None:
                    raise Conflict(
                        f"volume {spec.volume.name!r} is in use by job {busy.id} ({busy.status}); "
                        "wait for it to end or cancel it"
                    )
                vol = s.exec(select(VolumeRow).where(VolumeRow.name == spec.volume.name)).first()
                if vol is None:
                    s.add(VolumeRow(name=spec.volume.name, size_gb=spec.volume.size_gb,
                                    mount_path=spec.volume.mount_path, created_at=now))
            job = JobRow(
                id=job_id, name=spec.name, spec_json=spec.model_dump_json(), status=JobStatus.QUEUED.value,
                volume_name=spec.volume.name if spec.volume else None, created_at=now, updated_at=now,
                message="queued",
            )
            s.add(job)
            s.add(EventRow(job_id=job_id, at=now, kind="submitted", message=f"job {spec.name!r} submitted"))
            try:
                s.commit()
            except IntegrityError as exc:  # a concurrent submission made the same volume row
                s.rollback()
                raise Conflict(f"could not record job: {exc.orig}") from None
            return job

    def get_job(self, job_id: str) -> JobRow | None:
        with self._session() as s:
            return s.get(JobRow, job_id)

    def list_jobs(self, statuses: Sequence[str] | None = None, limit: int = 200) -> list[JobRow]:
        with self._session() as s:
            q = select(JobRow).order_by(col(JobRow.created_at).desc()).limit(limit)
            if statuses:
                q = q.where(col(JobRow.status).in_(list(statuses)))
            return list(s.exec(q))

    def active_jobs(self) -> list[JobRow]:
        with self._session() as s:
            return list(s.exec(select(JobRow).where(col(JobRow.status).in_(ACTIVE_STATUSES))))

    def update_job(self, job_id: str, **fields: Any) -> JobRow | None:
        with self._session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                return None
            for key, value in fields.items():
                setattr(job, key, value)
            job.updated_at = time.time()
            s.add(job)
            s.commit()
            return job

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Desired state only: the engine does the stopping. Cancelling an ended job is a no-op."""
        with self._session() as s:
            job = s.get(JobRow, job_id)
            if job is None or JobStatus(job.status).terminal or job.cancel_requested:
                return job
            job.cancel_requested = True
            job.updated_at = time.time()
            s.add(job)
            s.add(EventRow(job_id=job_id, at=job.updated_at, kind="cancel", message="cancel requested"))
            s.commit()
            return job

    # ------------------------------------------------------------------ attempts

    def attempts(self, job_id: str) -> list[AttemptRow]:
        with self._session() as s:
            q = select(AttemptRow).where(AttemptRow.job_id == job_id).order_by(col(AttemptRow.number))
            return list(s.exec(q))

    def attempts_for(self, job_ids: Iterable[str]) -> dict[str, list[AttemptRow]]:
        ids = list(job_ids)
        out: dict[str, list[AttemptRow]] = {i: [] for i in ids}
        if not ids:
            return out
        with self._session() as s:
            q = select(AttemptRow).where(col(AttemptRow.job_id).in_(ids)).order_by(col(AttemptRow.number))
            for row in s.exec(q):
                out[row.job_id].append(row)
        return out

    def live_attempts(self) -> list[AttemptRow]:
        with self._session() as s:
            q = select(AttemptRow).where(AttemptRow.status != AttemptStatus.ENDED.value)
            return list(s.exec(q))

    def attempt_by_name(self, name: str) -> AttemptRow | None:
        with self._session() as s:
            return s.exec(select(AttemptRow).where(AttemptRow.name == name)).first()

    def attempt_by_instance(self, provider: str, instance_id: str) -> AttemptRow | None:
        with self._session() as s:
            q = select(AttemptRow).where(
                AttemptRow.provider == provider, AttemptRow.instance_id == instance_id
            ).order_by(col(AttemptRow.number).desc())
            return s.exec(q).first()

    def next_attempt_number(self, job_id: str) -> int:
        with self._session() as s:
            n = s.exec(select(func.max(AttemptRow.number)).where(AttemptRow.job_id == job_id)).one()
            return int(n or 0) + 1

    def add_attempt(self, row: AttemptRow) -> AttemptRow:
        """The write-ahead record of a launch, committed before the provider is called."""
        with self._session() as s:
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def update_attempt(self, attempt_id: int, **fields: Any) -> AttemptRow | None:
        with self._session() as s:
            row = s.get(AttemptRow, attempt_id)
            if row is None:
                return None
            for key, value in fields.items():
                setattr(row, key, value)
            s.add(row)
            s.commit()
            return row

    def delete_attempt(self, attempt_id: int) -> None:
        """Only for a pending attempt that provably made nothing (every launch said no)."""
        with self._session() as s:
            row = s.get(AttemptRow, attempt_id)
            if row is not None and row.status == AttemptStatus.PENDING.value:
                s.delete(row)
                s.commit()

    def apply(self, job_id: str, job_fields: dict[str, Any], attempt_fields: dict[int, dict[str, Any]],
              events: Sequence[tuple[int | None, str, str]]) -> None:
        """One job's decided transitions, committed together."""
        now = time.time()
        with self._session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                return
            for attempt_id, fields in attempt_fields.items():
                row = s.get(AttemptRow, attempt_id)
                if row is None:
                    continue
                for key, value in fields.items():
                    setattr(row, key, value)
                s.add(row)
            if job_fields:
                for key, value in job_fields.items():
                    setattr(job, key, value)
                job.updated_at = now
                s.add(job)
            for attempt_no, kind, message in events:
                s.add(EventRow(job_id=job_id, attempt=attempt_no, at=now, kind=kind, message=message[:2048]))
            s.commit()

    # ------------------------------------------------------------------ volumes, events, stats

    def volume(self, name: str) -> VolumeRow | None:
        with self._session() as s:
            return s.exec(select(VolumeRow).where(VolumeRow.name == name)).first()

    def list_volumes(self) -> list[VolumeRow]:
        with self._session() as s:
            return list(s.exec(select(VolumeRow).order_by(col(VolumeRow.name))))

    def set_volume_location(self, name: str, provider: str, region: str, provider_volume_id: str) -> None:
        with self._session() as s:
            vol = s.exec(select(VolumeRow).where(VolumeRow.name == name)).first()
            if vol is None:
                return
            vol.provider, vol.region, vol.provider_volume_id = provider, region, provider_volume_id
            s.add(vol)
            s.commit()

    def add_event(self, job_id: str, kind: str, message: str, attempt: int | None = None) -> None:
        with self._session() as s:
            s.add(EventRow(job_id=job_id, attempt=attempt, at=time.time(), kind=kind, message=message[:2048]))
            s.commit()

    def events(self, job_id: str, limit: int = 200) -> list[EventRow]:
        with self._session() as s:
            q = select(EventRow).where(EventRow.job_id == job_id).order_by(col(EventRow.id).desc()).limit(limit)
            return list(reversed(list(s.exec(q))))

    def preemption_history(self) -> list[tuple[str, str, int, float]]:
        """(provider, capacity, preemptions, hours run) over every attempt that ever ran."""
        now = time.time()
        agg: dict[tuple[str, str], list[float]] = {}
        with self._session() as s:
            q = select(AttemptRow).where(col(AttemptRow.launched_at).is_not(None))
            for row in s.exec(q):
                key = (row.provider, row.capacity)
                slot = agg.setdefault(key, [0, 0.0])
                if row.end_reason == EndReason.PREEMPTED.value:
                    slot[0] += 1
                start = row.running_at or row.launched_at or now
                slot[1] += max(0.0, (row.ended_at or now) - start) / 3600.0
        return [(p, c, int(v[0]), v[1]) for (p, c), v in agg.items()]

    def counts_by_status(self) -> dict[str, int]:
        with self._session() as s:
            rows = s.exec(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
            return {status: int(n) for status, n in rows}
