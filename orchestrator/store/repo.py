"""The store's verbs: every read and write the API and the engine make, each its own short
transaction, so that every transition is committed before the next step relies on it.

Methods are synchronous (SQLAlchemy sessions); async callers run them with `Store.run`, which
moves the call to the store's own small thread pool, so a slow database never stalls the event
loop and a store call never queues behind provider SDK calls in the loop's default executor.

Rules that must hold under concurrent writers are the database's, not check-then-write code:
one unfinished job per volume is a unique index; writes that read first take the row lock
(PostgreSQL `FOR UPDATE`) or the write lock (SQLite `BEGIN IMMEDIATE`, see store.db).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from sqlalchemy import CursorResult, and_, bindparam, delete, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from orchestrator.models import AttemptStatus, EndReason, JobSpec, JobStatus, VolumeSpec
from orchestrator.store.cache import PlainRows
from orchestrator.store.db import make_engine, migrate, write_engine
from orchestrator.store.errors import Conflict, upsert
from orchestrator.store.feed import ActiveFeed, ActiveState
from orchestrator.store.leases import Fence, LeaseLost, LeaseStore, check_lease, check_replica
from orchestrator.store.moves import MoveStore
from orchestrator.store.tables import (
    AttemptRow,
    EventRow,
    JobRow,
    PreemptionStatsRow,
    RetiredVolumeRow,
    VolumeRow,
)
from orchestrator.store.workdirs import WorkdirStore

P = ParamSpec("P")
T = TypeVar("T")

ACTIVE_STATUSES = [s.value for s in JobStatus if not s.terminal]
TERMINAL_STATUSES = [s.value for s in JobStatus if s.terminal]
ENDED = AttemptStatus.ENDED.value


IN_CHUNK = 900  # ids per IN (...) list: SQLite allows 999 bound parameters in a statement


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items` in slices of IN_CHUNK, for IN (...) lists."""
    for n in range(0, len(items), IN_CHUNK):
        yield items[n:n + IN_CHUNK]


@dataclass(frozen=True)
class LaunchRecord:
    """A machine a launch got, to record against its attempt (Store.record_launches)."""

    attempt_id: int
    instance_id: str
    launched_at: float
    job_fields: dict[str, Any] | None = None
    events: Sequence[tuple[int | None, str, str]] = ()

# the tick's cached rows (store.cache.PlainRows), typed as the models whose attributes they carry
_PLAIN_JOBS = PlainRows(JobRow)
_PLAIN_ATTEMPTS = PlainRows(AttemptRow)
_JOBS_INSERT = JobRow.__table__.insert()  # type: ignore[attr-defined]
_EVENTS_INSERT = EventRow.__table__.insert()  # type: ignore[attr-defined]
_JOB_DEFAULTS = {c.name: c.default.arg if c.default is not None and not callable(c.default.arg) else None
                 for c in JobRow.__table__.columns}  # type: ignore[attr-defined]


def _update_rows(conn: Any, model: Any, changes: Sequence[tuple[Any, dict[str, Any]]], also: dict[str, Any]) -> None:
    """UPDATE rows by id, each with its own columns: one executemany per distinct set of
    columns; `also` is set on every row (its values the same for all)."""
    table = model.__table__
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for key, fields in changes:
        columns = tuple(sorted(fields))
        by_columns.setdefault(columns, []).append({**{f"v_{c}": fields[c] for c in columns}, "b_id": key})
    for columns, params in by_columns.items():
        stmt = table.update().where(table.c.id == bindparam("b_id")).values(
            {**{c: bindparam(f"v_{c}") for c in columns}, **also})
        conn.execute(stmt, params)


def _plain_job(values: dict[str, Any]) -> Any:
    """The row just inserted, as the tick's plain copies are (store.cache.PlainRows)."""
    return _PLAIN_JOBS.build([values.get(n, _JOB_DEFAULTS[n]) for n in _PLAIN_JOBS.names])

# Event kinds that repeat while nothing changes (every backoff try, every retry of one launch, every
# failed listing): a repeat of the job's latest event updates that row instead of adding one.
COALESCED_KINDS = frozenset({"no_capacity", "launch_retry", "provider_degraded"})

# How far an attempt's agent has got; reports only move it forward.
AGENT_STATE_ORDER = {"": 0, "started": 1, "exited": 2}
# What ending an attempt decides; the first end of an attempt is the one kept.
END_FIELDS = frozenset({"end_reason", "ended_at", "detail", "cost_usd"})



def merge_attempt(row: AttemptRow, fields: dict[str, Any]) -> list[str]:
    """Set `fields` on `row` except those that would move it backwards; return the refused names.

    "status" is among the refused whenever the attempt was already ended (that write's caller
    saw it live: its transition did not happen). A writer works from a snapshot it read earlier (the engine observes providers for seconds
    between reading and writing), while agent reports and billing land in between. So:

    - an ENDED attempt never becomes live again (pending, launching, running);
    - ending an attempt that is already ended changes none of END_FIELDS: the first end stands;
    - agent-reported columns only move forward: `last_heartbeat_at` never decreases,
      `agent_state` goes "" -> "started" -> "exited" only, `exit_code` and `exit_signal` keep the
      first value recorded (a snapshot's None or older value never replaces it),
      `sigterm_received` never goes back to False;
    - once `cost_final` is set, `cost_usd` changes only together with `cost_final=True` (an
      estimate never replaces the provider's final bill).
    """
    refused: list[str] = []
    was_ended = row.status == ENDED
    ending_again = was_ended and fields.get("status") == ENDED
    for key, value in fields.items():
        current = getattr(row, key)
        if key == "status":
            ok = not (was_ended and value != ENDED)
        elif ending_again and key in END_FIELDS:
            ok = value == current
        elif key == "last_heartbeat_at":
            ok = current is None or (value is not None and value >= current)
        elif key == "agent_state":
            ok = AGENT_STATE_ORDER.get(value, 0) >= AGENT_STATE_ORDER.get(current, 0)
        elif key in ("exit_code", "exit_signal"):
            ok = current is None or value == current
        elif key == "sigterm_received":
            ok = bool(value) or not current
        elif key == "cost_usd":
            ok = not row.cost_final or bool(fields.get("cost_final"))
        else:
            ok = True
        if ok:
            setattr(row, key, value)
        if (not ok and value != current) or (key == "status" and was_ended):
            refused.append(key)  # a status write to an ended attempt is stale even when equal
    return refused


def _utc(ts: float | None) -> str:
    return "?" if ts is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def ended_attempt_stats(row: AttemptRow, now: float) -> tuple[int, float] | None:
    """What an attempt that has just ended adds to its capacity's history (preemptions, hours),
    or None for one that never launched. Hours run from running (else launched) to ended."""
    if row.launched_at is None:
        return None
    start = row.running_at or row.launched_at
    hours = max(0.0, (row.ended_at or now) - start) / 3600.0
    return (1 if row.end_reason == EndReason.PREEMPTED.value else 0), hours


@dataclass(frozen=True)
class NewJob:
    """One submit for `Store.create_jobs`."""

    job_id: str
    spec: JobSpec
    reuse_volume: bool = True


class Store(LeaseStore, MoveStore, WorkdirStore):
    def __init__(self, url: str, *, engine: Engine | None = None, event_retention_days: float = 30.0,
                 threads: int = 4) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._writer = write_engine(self.engine)
        self.event_retention_days = event_retention_days
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpuhop-store")
        self._feed = ActiveFeed(_PLAIN_JOBS, _PLAIN_ATTEMPTS, ACTIVE_STATUSES)  # active_changes' rows
        # set when this daemon is a replica (store.leases): its engine's writes are fenced, it
        # reads only its own jobs, and jobs submitted through it are its own
        self.fence: Fence | None = None

    @property
    def _sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def migrate(self) -> None:
        migrate(self.engine)

    def close(self) -> None:
        """Wait for calls in flight, then close the connections."""
        self._executor.shutdown(wait=True)
        self.engine.dispose()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store method on the store's own threads (never the loop's default executor,
        which provider SDK calls fill)."""
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _session(self) -> Session:
        """For reads."""
        return Session(self.engine, expire_on_commit=False)

    def _write(self) -> Session:
        """For anything that writes: on SQLite it holds the write lock from its first statement."""
        return Session(self._writer, expire_on_commit=False)

    # ------------------------------------------------------------------ jobs

    def create_job(self, job_id: str, spec: JobSpec, now: float | None = None, *,
                   reuse_volume: bool = True) -> JobRow:
        """Record a job. Raises Conflict, naming the holder, when its volume is held by an
        unfinished job: the unique index `uq_jobs_active_volume` decides, so of any number of
        concurrent submissions on one volume exactly one is recorded. Also refused: a volume
        being deleted (the volume row is locked, so a deletion and a submit serialize; see
        `begin_volume_delete`) and, with `reuse_volume=False` (the API's default), a volume
        whose newest job succeeded (a job on it would resume from that job's final state)."""
        (result,) = self.create_jobs([NewJob(job_id, spec, reuse_volume)], now)
        if isinstance(result, Conflict):
            raise result
        return JobRow(**result.model_dump())

    def create_jobs(self, jobs: Sequence[NewJob], now: float | None = None) -> list[Any]:
        """Record several jobs in one transaction (group commit: the API's submits arrive
        together under load), each refused one (see `create_job`) taking back only its own rows.
        The answer is in the order given: the recorded row (a plain read-only copy, see
        store.cache.PlainRows) or the Conflict that refused it.

        Jobs without a volume go in with one multi-row insert, inside a savepoint: only a taken
        id can refuse one, and then they are retried one by one. A job with a volume has its
        volume row locked and checked first, in a savepoint of its own; volumes are locked in
        name order, so two batches cannot deadlock on PostgreSQL. Core statements with bound
        parameters: building an ORM insert per job was most of a submit's cost (issue 9)."""
        now = now or time.time()
        owner = self.fence.replica_id if self.fence else None
        rows: list[dict[str, Any]] = [{"id": j.job_id, "name": j.spec.name, "spec_json": j.spec.model_dump_json(),
                 "status": JobStatus.QUEUED.value, "volume_name": j.spec.volume.name if j.spec.volume else None,
                 "created_at": now, "updated_at": now, "message": "queued", "lease_owner": owner}
                for j in jobs]
        results: list[Any] = [None] * len(jobs)
        plain = [i for i, j in enumerate(jobs) if j.spec.volume is None]
        with self._write() as s:
            conn = s.connection()
            if plain and not self._insert_jobs(conn, [rows[i] for i in plain], now):
                plain = []  # a taken id among them: each goes alone below
            for i in plain:
                results[i] = _plain_job(rows[i])
            for i in sorted((i for i in range(len(jobs)) if results[i] is None), key=lambda i: rows[i]["volume_name"] or ""):
                spec = jobs[i].spec
                try:
                    with conn.begin_nested():
                        if spec.volume is not None:
                            self._volume_for_job(s, spec.volume, now, jobs[i].reuse_volume)
                        if not self._insert_jobs(conn, [rows[i]], now):
                            continue  # refused (its savepoint taken back); why is read once committed
                except Conflict as exc:
                    results[i] = exc
                else:
                    results[i] = _plain_job(rows[i])
            s.commit()
        return [r if r is not None else self._create_conflict(row["id"], row["volume_name"])
                for r, row in zip(results, rows, strict=True)]

    @staticmethod
    def _insert_jobs(conn: Any, rows: list[dict[str, Any]], now: float) -> bool:
        """Insert jobs and their `submitted` events in a savepoint; False (and nothing written)
        when the database refuses one of them."""
        try:
            with conn.begin_nested():
                conn.execute(_JOBS_INSERT, rows)
                conn.execute(_EVENTS_INSERT, [
                    {"job_id": r["id"], "at": now, "kind": "submitted", "attempt": None, "repeats": 0,
                     "message": f"job {r['name']!r} submitted"} for r in rows])
        except IntegrityError:
            return False
        return True

    def _create_conflict(self, job_id: str, volume: str | None) -> Conflict:
        """Why a job could not be recorded (the constraint's own text is not shown: it may quote
        the row)."""
        with self._session() as s:
            if s.get(JobRow, job_id) is not None:
                return Conflict(f"job {job_id} already exists", "job_exists")
            if volume is not None:
                holder = s.exec(
                    select(JobRow).where(JobRow.volume_name == volume, col(JobRow.status).in_(ACTIVE_STATUSES))
                ).first()
                if holder is not None:
                    return Conflict(
                        f"volume {volume!r} is in use by job {holder.id} ({holder.status}); "
                        "wait for it to end or cancel it"
                    )
                return Conflict(f"volume {volume!r} was claimed by another job at the same moment; try again")
            return Conflict(f"job {job_id} could not be recorded; try again")

    def get_job(self, job_id: str) -> JobRow | None:
        with self._session() as s:
            return s.get(JobRow, job_id)

    def list_jobs(self, statuses: Sequence[str] | None = None, limit: int = 200,
                  before: tuple[float, str] | None = None) -> list[JobRow]:
        """Newest first (created_at, then id, both descending); `before` = the (created_at, id)
        of the last job of the previous page: the page after it, however many jobs arrive
        meanwhile (keyset pagination, no OFFSET). Plain read-only copies (store.cache.PlainRows):
        a page is read on every `gpuhop list` and dashboard refresh, and loading it as ORM rows
        was half of the request's time (issue 9)."""
        table = JobRow.__table__  # type: ignore[attr-defined]
        base = sa_select(*(table.c[n] for n in _PLAIN_JOBS.names)).order_by(
            table.c.created_at.desc(), table.c.id.desc()).limit(limit)
        if before is not None:
            at, job_id = before
            base = base.where(or_(table.c.created_at < at, and_(table.c.created_at == at, table.c.id < job_id)))
        # one walk of an index in list order per status (ix_jobs_status_created_at_id), merged
        # here: `status IN (...)` made the database sort every job of those statuses
        queries = [base.where(table.c.status == status) for status in dict.fromkeys(statuses)] if statuses else [base]
        with self._session() as s:
            conn = s.connection()
            pages = [list(map(_PLAIN_JOBS.build, conn.execute(q))) for q in queries]
        if len(pages) == 1:
            return pages[0]
        newest_first = heapq.merge(*pages, key=lambda j: (j.created_at, j.id), reverse=True)
        return list(itertools.islice(newest_first, limit))

    def active_changes(self) -> ActiveState:
        """Every unfinished job (of this replica, when fenced) and all its attempts (in number
        order), as plain read-only rows, and which jobs changed since the previous call: read
        through the change feed (store/feed.py), in one read transaction. The maps are the
        feed's own, updated by the next call: read them before calling again."""
        with self._session() as s:
            # straight to the driver's cursor: 20,000 result rows through SQLAlchemy's Row
            # machinery cost more than everything else the tick reads
            cursor = s.connection().connection.cursor()
            try:
                return self._feed.read(cursor, "?" if self._sqlite else "%s", self._sqlite,
                                       self.fence.replica_id if self.fence else None)
            finally:
                cursor.close()

    def active_state(self) -> tuple[list[JobRow], dict[str, list[AttemptRow]]]:
        """`active_changes` as a copy: the jobs, and each one's attempts."""
        state = self.active_changes()
        return list(state.jobs.values()), {j: list(rows) for j, rows in state.attempts.items()}

    def foreign_active(self) -> set[str]:
        """The unfinished jobs this replica does not own (other replicas', or nobody's yet):
        read by the reaper only when it sees machines of jobs it does not know."""
        if self.fence is None:
            return set()
        with self._session() as s:
            q = select(JobRow.id).where(col(JobRow.status).in_(ACTIVE_STATUSES),
                                        or_(col(JobRow.lease_owner).is_(None),
                                            col(JobRow.lease_owner) != self.fence.replica_id))
            return set(s.exec(q))

    def active_jobs(self) -> list[JobRow]:
        with self._session() as s:
            return list(s.exec(select(JobRow).where(col(JobRow.status).in_(ACTIVE_STATUSES))))

    def update_job(self, job_id: str, **fields: Any) -> JobRow | None:
        """Set job columns as given. Raises Conflict if that would make a second unfinished job
        on a volume."""
        with self._write() as s:
            job = s.get(JobRow, job_id, with_for_update=True)
            if job is None:
                return None
            for key, value in fields.items():
                setattr(job, key, value)
            job.updated_at = time.time()
            volume = job.volume_name
            s.add(job)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                raise Conflict(f"job {job_id}: volume {volume!r} is held by another unfinished job") from None
            return job

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Desired state only: the engine does the stopping. Cancelling an ended job is a no-op."""
        with self._write() as s:
            job = s.get(JobRow, job_id, with_for_update=True)
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

    def attempts_since(self, since: float) -> list[tuple[AttemptRow, str]]:
        """Every attempt created at or after `since`, with its job's name (for cost reports)."""
        with self._session() as s:
            q = (select(AttemptRow, JobRow.name).join(JobRow, col(JobRow.id) == col(AttemptRow.job_id))
                 .where(col(AttemptRow.created_at) >= since).order_by(col(AttemptRow.created_at)))
            return [(row, name) for row, name in s.exec(q)]

    def ended_cost_by_capacity(self) -> dict[tuple[str, str], float]:
        """(provider, capacity) -> what ended attempts cost, duplicates included (one query)."""
        with self._session() as s:
            q = (select(AttemptRow.provider, AttemptRow.capacity,
                        func.sum(col(AttemptRow.cost_usd) + col(AttemptRow.duplicate_cost_usd)))
                 .where(AttemptRow.status == ENDED).group_by(AttemptRow.provider, AttemptRow.capacity))
            return {(p, c): float(total or 0.0) for p, c, total in s.exec(q)}

    def live_attempts(self) -> list[AttemptRow]:
        with self._session() as s:
            q = select(AttemptRow).where(AttemptRow.status != ENDED)
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
        """The write-ahead record of a launch, committed before the provider is called. Raises
        Conflict when an attempt of that name exists (the name is the idempotency key), or when
        the job already has a live attempt that is not under a reclaim notice (one job runs on
        one machine at a time; only an early replacement may start beside a warned attempt)."""
        (result,) = self.add_attempts([row])
        if isinstance(result, Exception):
            raise result
        return result

    def add_attempts(self, rows: Sequence[AttemptRow]) -> list[AttemptRow | Conflict | LeaseLost]:
        """Several launches' write-ahead records (as `add_attempt`, each refused one refused
        alone) in one transaction: a hundred replacements after a wave of preemptions commit a
        few times, not a hundred (issue 9: detection to launch call). The answer is in the
        order given: the row with its id, or why it was not recorded. Core statements: it is on
        every launch's path."""
        table = AttemptRow.__table__  # type: ignore[attr-defined]
        out: list[AttemptRow | Conflict | LeaseLost] = []
        with self._write() as s:
            conn = s.connection()
            job_ids = sorted({r.job_id for r in rows})
            owners = self._lock_jobs(conn, job_ids)  # one writer of these jobs' attempts at a time
            fenced = self._fence_refusal(s, time.time()) if owners else None
            busy: dict[str, tuple[int, str]] = {}
            names: set[str] = set()
            for part in _chunks(job_ids):
                busy.update((str(j), (int(num), str(st))) for j, num, st in conn.execute(
                    sa_select(table.c.job_id, table.c.number, table.c.status).where(
                        table.c.job_id.in_(part), table.c.status != ENDED, table.c.interruption_at.is_(None))))
            wanted = [r.name for r in rows]
            for part in _chunks(wanted):
                names.update(str(x) for x in conn.execute(
                    sa_select(table.c.name).where(table.c.name.in_(part))).scalars())
            for row in rows:
                refusal: Conflict | LeaseLost | None = None
                if row.job_id in owners:
                    refusal = fenced or self._owner_refusal(row.job_id, owners[row.job_id])
                if refusal is None and row.job_id in busy:
                    number, status = busy[row.job_id]
                    refusal = Conflict(f"job {row.job_id} already runs attempt {number} ({status})")
                if refusal is None and row.name in names:
                    refusal = Conflict(f"attempt {row.name!r} already exists")
                if refusal is not None:
                    out.append(refusal)
                    continue
                values = {k: v for k, v in row.model_dump().items() if k != "id"}
                key = conn.execute(table.insert().values(**values)).inserted_primary_key
                row.id = int(key[0]) if key is not None else None
                busy[row.job_id] = (row.number, row.status)
                names.add(row.name)
                out.append(row)
            s.commit()
        return out

    def _fence_refusal(self, s: Session, now: float) -> LeaseLost | None:
        """Why this replica may not write now (its own lease), or None."""
        if self.fence is None:
            return None
        try:
            check_replica(s, self.fence, now)
        except LeaseLost as exc:
            return exc
        return None

    def _owner_refusal(self, job_id: str, owner: str | None) -> LeaseLost | None:
        """Why this replica may not write a job owned by `owner` (read with its row locked)."""
        if self.fence is None or owner == self.fence.replica_id:
            return None
        return LeaseLost(f"job {job_id} is owned by {owner or 'nobody'}, not {self.fence.replica_id}")

    def update_attempt(self, attempt_id: int, **fields: Any) -> AttemptRow | None:
        """Set attempt columns, under the same rules as `apply` (see `merge_attempt`: nothing
        moves backwards). Returns the row as stored."""
        with self._write() as s:
            row = s.get(AttemptRow, attempt_id, with_for_update=True)
            if row is None:
                return None
            self._merge_attempt(s, row, fields, time.time())
            s.commit()
            return row

    def _merge_attempt(self, s: Session, row: AttemptRow, fields: dict[str, Any], now: float) -> list[str]:
        """merge_attempt on a locked row, and the preemption aggregate in the same transaction
        when this write is the one that ends it."""
        was_ended = row.status == ENDED
        refused = merge_attempt(row, fields)
        s.add(row)
        if not was_ended and row.status == ENDED:
            gained = ended_attempt_stats(row, now)
            if gained is not None:
                self._add_history(s, row.provider, row.capacity, *gained)
        return refused

    def _add_history(self, s: Session, provider: str, capacity: str, preemptions: int, hours: float) -> None:
        ins = upsert(s.get_bind().dialect.name, PreemptionStatsRow).values(
            provider=provider, capacity=capacity, preemptions=preemptions, hours=hours
        )
        s.execute(ins.on_conflict_do_update(
            index_elements=["provider", "capacity"],
            set_={"preemptions": PreemptionStatsRow.preemptions + ins.excluded.preemptions,
                  "hours": PreemptionStatsRow.hours + ins.excluded.hours},
        ))

    def record_launch(self, attempt_id: int, instance_id: str, launched_at: float,
                      job_fields: dict[str, Any] | None = None,
                      events: Sequence[tuple[int | None, str, str]] = ()) -> bool:
        """A launch worker's confirmed machine: a pending attempt becomes launching with it; one
        the tick adopted meanwhile keeps its status (never moved backwards). False when the
        attempt was ended meanwhile (a cancel): the caller stops the machine. `job_fields` and
        `events`, when given, are written with it (one transaction per launch, not two). Raises
        LeaseLost when another replica owns the job now."""
        (result,) = self.record_launches([LaunchRecord(attempt_id, instance_id, launched_at, job_fields, events)])
        if isinstance(result, LeaseLost):
            raise result
        return result

    def record_launches(self, records: Sequence[LaunchRecord]) -> list[bool | LeaseLost]:
        """Several `record_launch`es in one transaction, each answered on its own, in order."""
        now = time.time()
        attempts = AttemptRow.__table__  # type: ignore[attr-defined]
        out: list[bool | LeaseLost] = []
        with self._write() as s:
            conn = s.connection()
            ids = [r.attempt_id for r in records]
            job_of: dict[int, str] = {}
            for part in _chunks(ids):
                job_of.update((int(i), str(j)) for i, j in conn.execute(
                    sa_select(attempts.c.id, attempts.c.job_id).where(attempts.c.id.in_(part))))
            owners = self._lock_jobs(conn, sorted(set(job_of.values())))  # jobs first, as every writer
            fenced = self._fence_refusal(s, now) if owners else None
            rows = self._lock_attempts(conn, sorted(job_of))
            changes: list[tuple[int, dict[str, Any]]] = []
            plain: list[tuple[str, dict[str, Any], Sequence[tuple[int | None, str, str]]]] = []
            for rec in records:
                job_id = job_of.get(rec.attempt_id)
                row = rows.get(rec.attempt_id)
                if job_id is None or row is None:
                    out.append(False)
                    continue
                refusal = (fenced or self._owner_refusal(job_id, owners[job_id])) if job_id in owners else None
                if refusal is not None:
                    out.append(refusal)
                    continue
                if row.status == ENDED:
                    out.append(False)
                    continue
                fields: dict[str, Any] = {}
                if row.status == AttemptStatus.PENDING.value:
                    fields["status"] = AttemptStatus.LAUNCHING.value
                if not row.instance_id:
                    fields["instance_id"] = rec.instance_id
                if not row.launched_at:
                    fields["launched_at"] = rec.launched_at
                if fields:
                    changes.append((rec.attempt_id, fields))
                if (rec.job_fields or rec.events) and job_id in owners:
                    plain.append((job_id, rec.job_fields or {}, rec.events))
                out.append(True)
            _update_rows(conn, AttemptRow, changes, {})
            if plain:
                self._apply_plain(conn, plain, now)
            s.commit()
        return out

    def _lock_attempt(self, s: Session, attempt_id: int, job_first: bool = False) -> AttemptRow | None:
        """Lock an attempt for an engine write; when fenced (or asked), its job first (the order
        `apply` takes them in, so the two never deadlock), raising LeaseLost if the job is not
        ours."""
        if self.fence is not None or job_first:
            job_id = s.exec(select(AttemptRow.job_id).where(AttemptRow.id == attempt_id)).first()
            if job_id is None:
                return None
            check_lease(s, self.fence, s.get(JobRow, job_id, with_for_update=True), time.time())
        return s.get(AttemptRow, attempt_id, with_for_update=True)

    def finalize_cost(self, attempt_id: int, cost_usd: float, bill_started_at: float | None,
                      bill_ended_at: float | None) -> None:
        """The provider's final bill for the attempt's own machine, once its termination is
        confirmed: replaces the estimate made when the attempt ended."""
        self.update_attempt(attempt_id, cost_usd=cost_usd, cost_final=True,
                            bill_started_at=bill_started_at, bill_ended_at=bill_ended_at)

    def unbilled_attempts(self, ended_after: float, ended_before: float, limit: int = 200) -> list[AttemptRow]:
        """Ended attempts with a machine whose final bill was never recorded (the daemon was
        killed between stopping the machine and reading its bill, or the call timed out after
        the provider acted): their cost is still the estimate made when they ended. Oldest
        first, those that ended within (`ended_after`, `ended_before`)."""
        with self._session() as s:
            return list(s.exec(select(AttemptRow).where(
                AttemptRow.status == ENDED, col(AttemptRow.cost_final).is_(False),
                col(AttemptRow.instance_id).is_not(None), col(AttemptRow.ended_at) > ended_after,
                col(AttemptRow.ended_at) < ended_before,
            ).order_by(col(AttemptRow.ended_at)).limit(limit)).all())

    def add_duplicate_cost(self, attempt_id: int, cost_usd: float) -> None:
        """Add what a duplicate machine carrying this attempt's name cost (once per machine)."""
        with self._write() as s:
            row = s.get(AttemptRow, attempt_id, with_for_update=True)
            if row is None:
                return
            row.duplicate_cost_usd = (row.duplicate_cost_usd or 0.0) + cost_usd
            s.add(row)
            s.commit()

    def delete_attempt(self, attempt_id: int) -> None:
        """Only for a pending attempt that provably made nothing (every launch said no). Its job
        is locked first: the delete touches the job's row (migration 0009), in `apply`'s order."""
        with self._write() as s:
            row = self._lock_attempt(s, attempt_id, job_first=True)
            if row is not None and row.status == AttemptStatus.PENDING.value:
                s.delete(row)
                s.commit()

    def apply(self, job_id: str, job_fields: dict[str, Any], attempt_fields: dict[int, dict[str, Any]],
              events: Sequence[tuple[int | None, str, str]]) -> set[int]:
        """One job's decided transitions, committed together.

        The job row and then its attempts (in id order) are locked first, so concurrent writers
        serialize per job. Attempt fields go through `merge_attempt`: a decision made from an
        older snapshot never moves an attempt backwards (an ENDED attempt stays ended and keeps
        its first end; agent-reported columns keep newer values; a final bill is not replaced by
        an estimate). An attempt this call ends adds its preemption and hours to the capacity's
        aggregate in the same transaction. Events go through the same coalescing as `add_event`;
        events about an attempt whose status change was refused are dropped (they would describe
        a transition that did not happen).

        Returns the ids of attempts some of whose fields were refused (the caller's snapshot was
        stale for them).
        """
        now = time.time()
        with self._write() as s:
            job = s.get(JobRow, job_id, with_for_update=True)
            if job is None:
                return set()
            check_lease(s, self.fence, job, now)
            stale = self._apply_locked(s, job, job_fields, attempt_fields, events, now)
            s.commit()
        return stale

    def apply_many(self, items: Sequence[tuple[str, dict[str, Any], dict[int, dict[str, Any]],
                                              Sequence[tuple[int | None, str, str]]]]) -> set[str]:
        """Several jobs' transitions (each as `apply` takes them) in one transaction: a tick
        that ends a hundred preempted attempts commits once, not a hundred times (issue 9:
        detection to launch). Jobs are locked in id order. A job this replica no longer owns
        (store.leases) is skipped, not raised: returns the ids of the jobs skipped so.

        Core statements, several rows per statement (the ORM's load, flush and unit of work per
        row took 2.6 ms a job when a hundred preempted attempts ended in one tick): the rows
        are read as plain copies, `merge_attempt` decides on them as on ORM rows, and what it
        changed is written back, one UPDATE per set of columns."""
        now = time.time()
        refused: set[str] = set()
        items = sorted(items, key=lambda item: item[0])
        with self._write() as s:
            conn = s.connection()
            owners = self._lock_jobs(conn, [item[0] for item in items])
            fenced_out = self._fenced_out(s, now)
            mine = []
            for item in items:
                if item[0] not in owners:
                    continue
                if self.fence is not None and (fenced_out or owners[item[0]] != self.fence.replica_id):
                    refused.add(item[0])
                    continue
                mine.append(item)
            attempts = self._lock_attempts(conn, sorted({a for item in mine for a in item[2]}))
            plain: list[tuple[str, dict[str, Any], Sequence[tuple[int | None, str, str]]]] = []
            changes: list[tuple[int, dict[str, Any]]] = []
            for job_id, job_fields, attempt_fields, events in mine:
                dropped: set[int] = set()
                for attempt_id in sorted(attempt_fields):
                    row = attempts.get(attempt_id)
                    if row is None or row.job_id != job_id:
                        continue
                    fields = attempt_fields[attempt_id]
                    before = {k: getattr(row, k) for k in fields}
                    was_ended = row.status == ENDED
                    if "status" in merge_attempt(row, fields):
                        dropped.add(row.number)
                    changed = {k: getattr(row, k) for k in fields if getattr(row, k) != before[k]}
                    if changed:
                        changes.append((attempt_id, changed))
                    if not was_ended and row.status == ENDED:
                        gained = ended_attempt_stats(row, now)
                        if gained is not None:
                            self._add_history(s, row.provider, row.capacity, *gained)
                plain.append((job_id, job_fields, [e for e in events if e[0] is None or e[0] not in dropped]))
            _update_rows(conn, AttemptRow, changes, {})
            self._apply_plain(conn, plain, now)
            s.commit()
        return refused

    def _lock_attempts(self, conn: Any, attempt_ids: list[int]) -> dict[int, Any]:
        """The attempts' rows as plain copies (to merge into), locked on PostgreSQL (after their
        jobs: the order every writer takes)."""
        table = AttemptRow.__table__  # type: ignore[attr-defined]
        out: dict[int, Any] = {}
        for part in _chunks(attempt_ids):
            q = sa_select(*(table.c[c] for c in _PLAIN_ATTEMPTS.names)).where(table.c.id.in_(part))
            if not self._sqlite:
                q = q.order_by(table.c.id).with_for_update()
            out.update((row.id, row) for row in map(_PLAIN_ATTEMPTS.build, conn.execute(q)))
        return out

    def _lock_jobs(self, conn: Any, job_ids: list[str]) -> dict[str, str | None]:
        """Lock the jobs' rows (PostgreSQL; SQLite's write transaction holds the whole file) and
        read their owners. Absent ids are left out."""
        table = JobRow.__table__  # type: ignore[attr-defined]
        owners: dict[str, str | None] = {}
        for part in _chunks(job_ids):
            q = sa_select(table.c.id, table.c.lease_owner).where(table.c.id.in_(part))
            if not self._sqlite:
                q = q.order_by(table.c.id).with_for_update()
            owners.update((str(i), o) for i, o in conn.execute(q))
        return owners

    def _fenced_out(self, s: Session, now: float) -> bool:
        """Whether this replica's lease forbids writing now (check_lease's replica half)."""
        return self._fence_refusal(s, now) is not None

    def _apply_plain(self, conn: Any, items: list[tuple[str, dict[str, Any], Sequence[tuple[int | None, str, str]]]],
                     now: float) -> None:
        """Job fields and events of jobs whose attempts do not change, in a few statements: one
        UPDATE per distinct set of columns (executemany), the events' coalescing decided here
        against each job's latest event, read in one query."""
        _update_rows(conn, JobRow, [(job_id, job_fields) for job_id, job_fields, _ in items if job_fields],
                     {"updated_at": now})
        with_events = [job_id for job_id, _, events in items if events]
        if not with_events:
            return
        events_table = EventRow.__table__  # type: ignore[attr-defined]
        latest: dict[str, tuple[int | None, str, int | None, dict[str, Any] | None]] = {}
        if any(kind in COALESCED_KINDS for _, _, events in items for _, kind, _ in events):
            for part in _chunks(with_events):
                newest = sa_select(func.max(events_table.c.id)).where(
                    events_table.c.job_id.in_(part)).group_by(events_table.c.job_id)
                q = sa_select(events_table.c.id, events_table.c.job_id, events_table.c.kind,
                              events_table.c.attempt).where(events_table.c.id.in_(newest.scalar_subquery()))
                for event_id, job_id, kind, attempt in conn.execute(q):
                    latest[str(job_id)] = (int(event_id), str(kind), attempt, None)
        inserts: list[dict[str, Any]] = []
        repeats: dict[int, dict[str, Any]] = {}
        for job_id, _, events in items:
            for attempt, kind, message in events:
                message = message[:2048]
                last = latest.get(job_id)
                if kind in COALESCED_KINDS and last is not None and last[1] == kind and last[2] == attempt:
                    if last[3] is not None:  # a row of this batch: fold into it
                        last[3].update(message=message, at=now, repeats=last[3]["repeats"] + 1)
                    else:
                        assert last[0] is not None
                        bump = repeats.setdefault(last[0], {"b_id": last[0], "v_message": message, "v_at": now, "n": 0})
                        bump.update(v_message=message, n=bump["n"] + 1)
                    continue
                row = {"job_id": job_id, "attempt": attempt, "at": now, "kind": kind, "message": message, "repeats": 0}
                inserts.append(row)
                latest[job_id] = (None, kind, attempt, row)
        if inserts:
            conn.execute(events_table.insert(), inserts)
        if repeats:
            conn.execute(events_table.update().where(events_table.c.id == bindparam("b_id")).values(
                message=bindparam("v_message"), at=bindparam("v_at"),
                repeats=events_table.c.repeats + bindparam("n")), list(repeats.values()))

    def _apply_locked(self, s: Session, job: JobRow, job_fields: dict[str, Any],
                      attempt_fields: dict[int, dict[str, Any]], events: Sequence[tuple[int | None, str, str]],
                      now: float) -> set[int]:
        stale: set[int] = set()
        dropped_numbers: set[int] = set()
        for attempt_id in sorted(attempt_fields):
            row = s.get(AttemptRow, attempt_id, with_for_update=True)
            if row is None or row.job_id != job.id:
                continue
            refused = self._merge_attempt(s, row, attempt_fields[attempt_id], now)
            if refused:
                stale.add(attempt_id)
                if "status" in refused:
                    dropped_numbers.add(row.number)
        if job_fields:
            for key, value in job_fields.items():
                setattr(job, key, value)
            job.updated_at = now
            s.add(job)
        for attempt_no, kind, message in events:
            if attempt_no is None or attempt_no not in dropped_numbers:
                self._add_event(s, job.id, attempt_no, kind, message, now)
        return stale

    # ------------------------------------------------------------------ volumes, events, stats

    def volume(self, name: str) -> VolumeRow | None:
        with self._session() as s:
            return s.exec(select(VolumeRow).where(VolumeRow.name == name)).first()

    def list_volumes(self) -> list[VolumeRow]:
        with self._session() as s:
            return list(s.exec(select(VolumeRow).order_by(col(VolumeRow.name))))

    def volume_usage(self) -> dict[str, tuple[int, str | None, float | None]]:
        """Per volume name: how many jobs named it, the one that has not ended (if any), and when
        a job last touched it (its latest update)."""
        with self._session() as s:
            rows = s.exec(
                select(JobRow.volume_name, func.count(), func.max(JobRow.updated_at))
                .where(col(JobRow.volume_name).is_not(None)).group_by(JobRow.volume_name)
            ).all()
            active = dict(s.exec(
                select(JobRow.volume_name, JobRow.id)
                .where(col(JobRow.volume_name).is_not(None), col(JobRow.status).not_in(TERMINAL_STATUSES))
            ).all())
        return {str(name): (int(n), active.get(name), last) for name, n, last in rows}

    def set_volume_location(self, name: str, provider: str, region: str, provider_volume_id: str,
                            spec: VolumeSpec | None = None) -> bool:
        """Record where volume `name` lives. If its row is gone (`gpuhop volume rm` ran while a
        launch was creating it), the row is made again from `spec`, so that a volume that now
        exists at the provider is listed, priced and deletable, never orphaned. Returns whether
        the row was there."""
        with self._write() as s:
            vol = s.exec(select(VolumeRow).where(VolumeRow.name == name)).first()
            found = vol is not None
            if vol is None:
                if spec is None:
                    return False
                vol = VolumeRow(name=name, size_gb=spec.size_gb, mount_path=spec.mount_path, created_at=time.time())
            elif vol.provider and vol.provider_volume_id and (vol.provider, vol.provider_volume_id) != (
                    provider, provider_volume_id):
                # never forget a provider volume that bills: the one replaced is deleted later
                s.add(RetiredVolumeRow(volume_name=name, provider=vol.provider, region=vol.region or "",
                                       provider_volume_id=vol.provider_volume_id, created_at=time.time(),
                                       reason=f"replaced by {provider_volume_id} in {provider} {region}"))
            vol.provider, vol.region, vol.provider_volume_id = provider, region, provider_volume_id
            s.add(vol)
            s.commit()
            return found

    # Deleting a volume takes two transactions around the provider's call, which is too slow to
    # hold a lock over: `begin_volume_delete` claims the row (refused while a job that has not
    # ended names it), the caller deletes the provider's volume, then `finish_volume_delete`
    # removes the row, or `abort_volume_delete` gives the claim back. A submit naming a claimed
    # volume is refused (`_volume_for_job`); both lock the volume row first, so whichever
    # commits first wins and the other sees it. The jobs that used a deleted volume let go of
    # its name (jobs.volume_name, read only by the volume rule and the listings; the spec keeps
    # it), so a new volume of that name starts with no history.

    def volume_synced(self, name: str) -> bool:
        """Whether a job that named the volume synced it through object storage (its
        checkpoints in the bucket go with it when it is deleted)."""
        with self._session() as s:
            specs = s.exec(select(JobRow.spec_json).where(JobRow.volume_name == name)).all()
        return any((v := JobSpec.model_validate_json(spec).volume) is not None and v.sync == "object-store"
                   for spec in specs)

    def _newest_job(self, s: Session, name: str) -> JobRow | None:
        q = (select(JobRow).where(JobRow.volume_name == name)
             .order_by(col(JobRow.created_at).desc(), col(JobRow.id).desc()).limit(1))
        return s.exec(q).first()

    def _locked_volume(self, s: Session, name: str) -> VolumeRow | None:
        return s.exec(select(VolumeRow).where(VolumeRow.name == name).with_for_update()).first()

    def _volume_for_job(self, s: Session, spec: VolumeSpec, now: float, reuse_volume: bool) -> None:
        """Make sure the volume row exists and lock it, then check that a new job may use it."""
        name = spec.name
        dialect = s.get_bind().dialect.name
        for _ in range(3):
            s.execute(
                upsert(dialect, VolumeRow).values(
                    name=name, size_gb=spec.size_gb, mount_path=spec.mount_path, created_at=now,
                ).on_conflict_do_nothing(index_elements=["name"])
            )
            # PostgreSQL: a deletion may have removed the row between the two statements (the
            # insert saw it and did nothing; the lock waited for the deletion and found nothing):
            # insert again, now into a free name
            vol = self._locked_volume(s, name)
            if vol is not None:
                break
        else:
            raise Conflict(f"volume {name!r} was being deleted at the same moment; submit again", "volume_deleting")
        if vol.deleting_token is not None:
            raise Conflict(
                f"volume {name!r} is being deleted (since {_utc(vol.deleting_since)}); name another volume, "
                f"or submit again once `gpuhop volumes` no longer lists it (if the deletion was interrupted, "
                f"`gpuhop volume rm {name}` finishes it)", "volume_deleting")
        if reuse_volume:
            return
        newest = self._newest_job(s, name)
        if newest is not None and newest.status == JobStatus.SUCCEEDED.value:
            raise Conflict(
                f"volume {name!r} holds the final state of job {newest.id} ({newest.name!r}), which succeeded: "
                f"a job on it would resume from there and end at once. Pass --reuse-volume "
                f"(?reuse_volume=true) to run on it anyway, name a fresh volume, or delete this one with "
                f"`gpuhop volume rm {name}`", "volume_finished")

    def begin_volume_delete(self, name: str, token: str, now: float | None = None, *,
                            unused_since: float | None = None, lease_seconds: float = 300.0) -> VolumeRow | None:
        """Claim volume `name` for deletion under `token`, and return it as claimed (None: no
        such volume). Raises Conflict when a job that has not ended names it (the rule of the
        unique index `uq_jobs_active_volume`), when another deletion claimed it less than
        `lease_seconds` ago, or, given `unused_since`, when a job used it since then."""
        now = time.time() if now is None else now
        with self._write() as s:
            vol = self._locked_volume(s, name)
            if vol is None:
                return None
            holder = s.exec(select(JobRow).where(JobRow.volume_name == name,
                                                 col(JobRow.status).not_in(TERMINAL_STATUSES))).first()
            if holder is not None:
                raise Conflict(f"volume {name!r} is in use by job {holder.id} ({holder.status}); "
                               f"cancel it (`gpuhop cancel {holder.id}`) or wait for it to end, then delete the volume",
                               "volume_in_use")
            if vol.move_attempt is not None:
                raise Conflict(f"volume {name!r} is moving to {vol.move_provider} {vol.move_region}; "
                               "try again in a minute", "volume_in_use")
            if vol.deleting_token is not None and (vol.deleting_since or 0.0) > now - lease_seconds:
                raise Conflict(f"volume {name!r} is already being deleted (since {_utc(vol.deleting_since)})",
                               "volume_deleting")
            if unused_since is not None and self._last_used(s, vol) >= unused_since:
                raise Conflict(f"volume {name!r} was used since {_utc(unused_since)}", "volume_used")
            vol.deleting_since, vol.deleting_token = now, token
            s.add(vol)
            s.commit()
            return vol

    def finish_volume_delete(self, name: str, token: str, why: str) -> bool:
        """Remove the row of a volume claimed under `token` (its provider volume is gone), let
        the jobs that used it go of its name, and tell the newest of them why, in the same
        transaction. False: not ours."""
        now = time.time()
        with self._write() as s:
            vol = self._locked_volume(s, name)
            if vol is None or vol.deleting_token != token:
                return False
            newest = self._newest_job(s, name)
            s.execute(update(JobRow).where(col(JobRow.volume_name) == name,
                                           col(JobRow.status).in_(TERMINAL_STATUSES))
                      .values(volume_name=None).execution_options(synchronize_session=False))
            s.delete(vol)
            if newest is not None:
                self._add_event(s, newest.id, None, "volume_deleted", f"volume {name!r} deleted: {why}", now)
            s.commit()
            return True

    def abort_volume_delete(self, name: str, token: str) -> None:
        """Give a claim back (the provider refused): the volume stays, usable again."""
        with self._write() as s:
            vol = self._locked_volume(s, name)
            if vol is not None and vol.deleting_token == token:
                vol.deleting_since, vol.deleting_token = None, None
                s.add(vol)
                s.commit()

    def _last_used(self, s: Session, vol: VolumeRow) -> float:
        last = s.exec(select(func.max(JobRow.updated_at)).where(JobRow.volume_name == vol.name)).one()
        return max(vol.created_at, float(last or 0.0))

    def volumes_to_sweep(self, unused_since: float | None, claimed_before: float) -> list[tuple[str, bool]]:
        """(name, interrupted) of every volume retention should delete now: those no job has
        used since `unused_since` (None: none of those) and no job that has not ended names,
        and those whose deletion was claimed before `claimed_before` and never finished
        (interrupted=True). Each is checked again when it is claimed."""
        out: list[tuple[str, bool]] = []
        with self._session() as s:
            last = dict(s.exec(
                select(JobRow.volume_name, func.max(JobRow.updated_at))
                .where(col(JobRow.volume_name).is_not(None)).group_by(JobRow.volume_name)
            ).all())
            active = set(s.exec(select(JobRow.volume_name).where(
                col(JobRow.volume_name).is_not(None), col(JobRow.status).not_in(TERMINAL_STATUSES))).all())
            for vol in s.exec(select(VolumeRow).order_by(col(VolumeRow.name))):
                if vol.name in active:
                    continue
                if vol.deleting_token is not None:
                    if (vol.deleting_since or 0.0) < claimed_before:
                        out.append((vol.name, True))
                elif unused_since is not None and max(vol.created_at, last.get(vol.name) or 0.0) < unused_since:
                    out.append((vol.name, False))
        return out

    def add_event(self, job_id: str, kind: str, message: str, attempt: int | None = None) -> None:
        """Append to the job's log; a repeat of its latest event of a COALESCED_KINDS kind (same
        attempt) updates that row instead: its message and time become the newest, `repeats`
        counts the repetitions."""
        with self._write() as s:
            self._add_event(s, job_id, attempt, kind, message, time.time())
            s.commit()

    def _add_event(self, s: Session, job_id: str, attempt: int | None, kind: str, message: str, now: float) -> None:
        message = message[:2048]
        if kind in COALESCED_KINDS:
            latest = s.exec(
                select(EventRow).where(EventRow.job_id == job_id).order_by(col(EventRow.id).desc()).limit(1)
            ).first()
            if latest is not None and latest.kind == kind and latest.attempt == attempt:
                s.execute(
                    update(EventRow).where(col(EventRow.id) == latest.id)
                    .values(message=message, at=now, repeats=col(EventRow.repeats) + 1)
                    .execution_options(synchronize_session=False)
                )
                s.expire(latest)
                return
        s.add(EventRow(job_id=job_id, attempt=attempt, at=now, kind=kind, message=message))

    def events(self, job_id: str, limit: int = 200) -> list[EventRow]:
        with self._session() as s:
            q = select(EventRow).where(EventRow.job_id == job_id).order_by(col(EventRow.id).desc()).limit(limit)
            return list(reversed(list(s.exec(q))))

    def prune(self, now: float | None = None, *, batch_size: int = 1000, max_batches: int = 100) -> int:
        """Delete events older than `event_retention_days` of jobs that have ended, `batch_size`
        rows per transaction (other writers get the lock between batches), at most `max_batches`
        batches per call. Returns how many were deleted; call again while it returns a full
        `batch_size * max_batches`."""
        now = time.time() if now is None else now
        cutoff = now - self.event_retention_days * 86400.0
        ended = select(JobRow.id).where(col(JobRow.status).in_(TERMINAL_STATUSES))
        total = 0
        for _ in range(max_batches):
            batch = (
                select(EventRow.id).where(col(EventRow.at) < cutoff, col(EventRow.job_id).in_(ended))
                .limit(batch_size)
            )
            with self._write() as s:
                result = s.execute(
                    delete(EventRow).where(col(EventRow.id).in_(batch)).execution_options(synchronize_session=False)
                )
                s.commit()
            n = cast(CursorResult[Any], result).rowcount
            total += n
            if n < batch_size:
                break
        return total

    def preemption_history(self) -> list[tuple[str, str, int, float]]:
        """(provider, capacity, preemptions, hours run) over every attempt that ever launched:
        the aggregate of ended attempts plus the hours live attempts have run so far."""
        now = time.time()
        agg: dict[tuple[str, str], list[float]] = {}
        with self._session() as s:
            for stat in s.exec(select(PreemptionStatsRow)):
                agg[(stat.provider, stat.capacity)] = [stat.preemptions, stat.hours]
            q = select(AttemptRow.provider, AttemptRow.capacity, AttemptRow.running_at, AttemptRow.launched_at).where(
                AttemptRow.status != ENDED, col(AttemptRow.launched_at).is_not(None)
            )
            for provider, capacity, running_at, launched_at in s.exec(q):
                slot = agg.setdefault((provider, capacity), [0, 0.0])
                slot[1] += max(0.0, now - (running_at or launched_at or now)) / 3600.0
        return [(p, c, int(v[0]), v[1]) for (p, c), v in agg.items()]

    def counts_by_status(self) -> dict[str, int]:
        with self._session() as s:
            rows = s.exec(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
            return {status: int(n) for status, n in rows}
