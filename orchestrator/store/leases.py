"""Leases: how several daemons (replicas) share one database and never decide the same job.

Each replica has a row in `replicas`: its lease, renewed by heartbeat (`expires_at`), and its
fencing token (`epoch`, bumped every time it registers). Each unfinished job names its owner in
`jobs.lease_owner`. One lease per replica rather than one per job: renewing is one row whatever
the number of jobs, and a job's lease is its owner's.

- A replica's engine reads and decides only the jobs it owns (`Store.active_state`).
- A job submitted through a replica is that replica's from the start; a job whose owner's lease
  expired (or that nobody owns, as after an upgrade) is claimed by another replica, with
  `FOR UPDATE SKIP LOCKED` on PostgreSQL so claimers never wait for each other or for a writer.
- Every write an engine makes about a job (`apply`, `add_attempt`, `record_launch`,
  `delete_attempt`) checks, in the same transaction and under the job's row lock, that the job
  is still this replica's and that this replica's lease is current with this epoch
  (`check_lease`). A claim takes the same row lock, so a write and a claim serialize: a replica
  that lost its lease, was paused past it, or was replaced by a newer process under the same id
  cannot write. What it had in flight is safe because launches are idempotent by attempt name:
  the new owner re-issues a pending attempt's launch under the same name and finds the machine.

Agent reports and API calls are not fenced: they record facts and wishes (a heartbeat, a cancel),
which any replica may write and the owner reads on its next tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, func, or_, update
from sqlmodel import Session, col, select

from orchestrator.models import AttemptStatus, JobStatus
from orchestrator.store.errors import Conflict, upsert
from orchestrator.store.tables import AttemptRow, ClusterSecretRow, JobRow, ReplicaRow

ACTIVE_STATUSES = [s.value for s in JobStatus if not s.terminal]


@dataclass(frozen=True)
class Fence:
    """Who this store writes as: a replica and the epoch it registered with."""

    replica_id: str
    epoch: int


class LeaseLost(Conflict):
    """This replica may no longer write about this job (another owns it, or our lease expired)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "lease_lost")


def check_lease(s: Session, fence: Fence | None, job: JobRow | None, now: float) -> None:
    """Raise LeaseLost unless `fence` may write about `job` now. Call with the job row locked.
    No fence (a store used without replicas, as in unit tests) checks nothing."""
    if fence is None or job is None:
        return
    if job.lease_owner != fence.replica_id:
        raise LeaseLost(f"job {job.id} is owned by {job.lease_owner or 'nobody'}, not {fence.replica_id}")
    check_replica(s, fence, now)


def check_replica(s: Session, fence: Fence, now: float) -> None:
    """Raise LeaseLost unless `fence`'s replica still holds its lease, in the same epoch."""
    me = s.get(ReplicaRow, fence.replica_id)
    if me is None or me.epoch != fence.epoch:
        raise LeaseLost(f"replica {fence.replica_id} epoch {fence.epoch} was replaced")
    if me.expires_at <= now:
        raise LeaseLost(f"replica {fence.replica_id}'s lease expired {now - me.expires_at:.1f} s ago")


class LeaseStore:
    """The lease verbs, mixed into Store (which provides the sessions)."""

    fence: Fence | None = None
    _write: Callable[[], Session]
    _session: Callable[[], Session]

    def register_replica(self, replica_id: str, url: str, ttl: float, now: float | None = None) -> Fence:
        """Start (or restart) a replica's lease with a new epoch. A restarted replica (same id)
        keeps its jobs and fences out any older process of itself that still runs."""
        now = now or time.time()
        with self._write() as s:
            row = s.get(ReplicaRow, replica_id, with_for_update=True)
            if row is None:
                row = ReplicaRow(id=replica_id, epoch=1, url=url, started_at=now, heartbeat_at=now,
                                 expires_at=now + ttl)
            else:
                row.epoch += 1
                row.url, row.started_at, row.heartbeat_at, row.expires_at = url, now, now, now + ttl
            s.add(row)
            s.commit()
            return Fence(replica_id, row.epoch)

    def renew_replica(self, fence: Fence, ttl: float, now: float | None = None) -> bool:
        """Extend the lease. False when it cannot be: a newer process registered this id, or the
        lease had already expired (its jobs may have been claimed; register again)."""
        now = now or time.time()
        with self._write() as s:
            result = s.execute(
                update(ReplicaRow)
                .where(col(ReplicaRow.id) == fence.replica_id, col(ReplicaRow.epoch) == fence.epoch,
                       col(ReplicaRow.expires_at) > now)
                .values(heartbeat_at=now, expires_at=now + ttl)
            )
            s.commit()
            return bool(getattr(result, "rowcount", 0))

    def retire_replica(self, fence: Fence) -> None:
        """A clean stop: end the lease now so the other replicas claim its jobs at once."""
        with self._write() as s:
            s.execute(update(ReplicaRow).where(col(ReplicaRow.id) == fence.replica_id,
                                               col(ReplicaRow.epoch) == fence.epoch).values(expires_at=0.0))
            s.commit()

    def replicas(self) -> list[ReplicaRow]:
        with self._session() as s:
            return list(s.exec(select(ReplicaRow).order_by(col(ReplicaRow.id))))

    def claim_jobs(self, fence: Fence, now: float | None = None, limit: int = 2000,
                   host_bound: frozenset[str] = frozenset()) -> list[str]:
        """Take unfinished jobs that no live replica owns (their owner's lease expired, or none).
        Not those of another replica with a live attempt on a `host_bound` provider (the local
        machine of the replica that launched it, which no other replica can see or stop): they
        wait for their replica to come back. Raises LeaseLost if this replica's own lease is not current."""
        now = now or time.time()
        with self._write() as s:
            me = s.get(ReplicaRow, fence.replica_id)
            if me is None or me.epoch != fence.epoch or me.expires_at <= now:
                raise LeaseLost(f"replica {fence.replica_id} cannot claim: its lease is not current")
            # a fair share, not all: each live replica takes up to an equal part of every
            # unfinished job (counting what it has), so a dead replica's jobs are spread over the
            # survivors; once every survivor is at its share the sum covers them all
            live = s.exec(select(func.count()).select_from(ReplicaRow)
                          .where(col(ReplicaRow.expires_at) > now)).one()
            total = s.exec(select(func.count()).select_from(JobRow)
                           .where(col(JobRow.status).in_(ACTIVE_STATUSES))).one()
            mine = s.exec(select(func.count()).select_from(JobRow)
                          .where(col(JobRow.status).in_(ACTIVE_STATUSES),
                                 col(JobRow.lease_owner) == fence.replica_id)).one()
            limit = min(limit, -(-int(total) // max(1, int(live))) - int(mine))
            if limit <= 0:
                s.commit()
                return []
            expired = select(ReplicaRow.id).where(col(ReplicaRow.expires_at) <= now)
            known = select(ReplicaRow.id)
            q = (select(JobRow.id)
                 .where(col(JobRow.status).in_(ACTIVE_STATUSES),
                        or_(col(JobRow.lease_owner).is_(None), col(JobRow.lease_owner).in_(expired),
                            col(JobRow.lease_owner).not_in(known)))
                 .order_by(col(JobRow.created_at)).limit(limit))
            if host_bound:
                pinned = select(AttemptRow.job_id).where(col(AttemptRow.status) != AttemptStatus.ENDED.value,
                                                         col(AttemptRow.provider).in_(sorted(host_bound)))
                # a job nobody owns yet (written before replicas existed: by the one daemon
                # that ran, whose database this is) is claimed whatever it runs on
                q = q.where(or_(col(JobRow.lease_owner).is_(None), col(JobRow.id).not_in(pinned)))
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)  # a row being written or claimed: next round
            ids = list(s.exec(q))
            if ids:
                s.execute(update(JobRow).where(col(JobRow.id).in_(ids)).values(lease_owner=fence.replica_id))
            s.commit()
            return ids

    def prune_replicas(self, older_than: float, now: float | None = None) -> int:
        """Forget replicas whose lease ended more than `older_than` seconds ago and that own no
        unfinished job (replicas that never came back: a container's random host name, a
        state dir moved). Returns how many were removed."""
        now = now or time.time()
        with self._write() as s:
            owning = select(JobRow.lease_owner).where(col(JobRow.status).in_(ACTIVE_STATUSES),
                                                      col(JobRow.lease_owner).is_not(None))
            result = s.execute(delete(ReplicaRow).where(col(ReplicaRow.expires_at) < now - older_than,
                                                        col(ReplicaRow.id).not_in(owning)))
            s.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    def shared_secret(self, name: str, candidate: str) -> str:
        """The cluster's value of a secret: `candidate` if no replica recorded one yet."""
        with self._write() as s:
            ins = upsert(s.get_bind().dialect.name, ClusterSecretRow)
            s.execute(ins.values(name=name, value=candidate).on_conflict_do_nothing(index_elements=["name"]))
            s.commit()
            row = s.get(ClusterSecretRow, name)
            return row.value if row is not None else candidate
