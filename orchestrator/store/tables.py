"""The tables: jobs, their attempts, volumes, an event log and the preemption aggregate. Plain
rows, no behaviour.

Times are UNIX seconds (floats) so SQLite and PostgreSQL store and compare them alike; the API
renders them as ISO 8601. The job spec is stored whole as validated JSON: it is the desired
state, and the columns beside it are what the engine has made of it so far.

One rule lives in the schema rather than in code, because only the database sees concurrent
writers: a volume serves at most one unfinished job (`uq_jobs_active_volume`, a partial unique
index; see `ACTIVE_VOLUME_WHERE`).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, LargeBinary, text
from sqlmodel import Field, SQLModel

# The job statuses that free a volume, frozen as SQL so the index predicate does not drift with
# the enum unnoticed (tests compare it with JobStatus.terminal). "Not terminal" rather than "one of
# the active ones": a status added later holds its volume until someone decides otherwise.
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_VOLUME_WHERE = "volume_name IS NOT NULL AND status NOT IN ({})".format(
    ", ".join(f"'{s}'" for s in TERMINAL_JOB_STATUSES)
)


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        # at most one unfinished job per volume, enforced by the database on SQLite and PostgreSQL
        Index("uq_jobs_active_volume", "volume_name", unique=True,
              sqlite_where=text(ACTIVE_VOLUME_WHERE), postgresql_where=text(ACTIVE_VOLUME_WHERE)),
        # the job list's order, newest first (keyset pagination walks it)
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_created_at_id", "status", "created_at", "id"),
    )

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=64, index=True)
    spec_json: str
    status: str = Field(max_length=16, index=True)
    end_reason: str | None = Field(default=None, max_length=512)
    volume_name: str | None = Field(default=None, max_length=64, index=True)
    cancel_requested: bool = False
    relaunches: int = 0  # attempts lost or preempted so far
    retries: int = 0  # attempts failed with a non-zero exit so far
    next_try_at: float | None = None  # placement backoff when nothing fits
    message: str = Field(default="", max_length=1024)  # the latest thing worth telling the user
    created_at: float
    updated_at: float
    finished_at: float | None = None
    # the replica whose engine decides this job (store.leases); None until one claims it
    lease_owner: str | None = Field(default=None, max_length=64, index=True)
    lease_expires: float | None = None  # unused: a job's lease expires with its owner's replica row
    # bumped by a database trigger on every UPDATE (migration 0003): the store's read cache key
    version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    # stamped by a database trigger on every INSERT and UPDATE with a position in commit order
    # (migration 0009): what the tick's change feed (store/feed.py) asks "since when" about
    changed: int = Field(default=0, sa_type=BigInteger, index=True, sa_column_kwargs={"server_default": "0"})


class AttemptRow(SQLModel, table=True):
    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=32)
    number: int
    name: str = Field(unique=True, max_length=96)  # <prefix>-<job>-<number>: the idempotency key
    provider: str = Field(max_length=32)
    region: str = Field(default="", max_length=64)
    offer_id: str = Field(default="", max_length=256)
    capacity: str = Field(default="", max_length=16)
    gpu: str | None = Field(default=None, max_length=32)
    gpu_count: int = 0
    price_per_hour: float = 0.0
    instance_id: str | None = Field(default=None, max_length=128, index=True)
    volume_id: str | None = Field(default=None, max_length=128)
    status: str = Field(max_length=16, index=True)
    end_reason: str | None = Field(default=None, max_length=32)
    detail: str = Field(default="", max_length=1024)  # why it ended, in words
    exit_code: int | None = None
    exit_signal: int | None = None
    agent_state: str = Field(default="", max_length=16)  # "", "started", "exited" (agent reports)
    sigterm_received: bool = False  # the job got a SIGTERM that gpuhop did not send (a notice)
    placement_reason: str = Field(default="", max_length=1024)
    created_at: float
    launched_at: float | None = None
    running_at: float | None = None
    ended_at: float | None = None
    last_heartbeat_at: float | None = None
    interruption_at: float | None = None  # a provider's reclaim notice was received
    stop_requested_at: float | None = None  # gpuhop asked the instance to stop
    cost_usd: float = 0.0
    # the provider's own account of billing (adapters' Bill): None until the provider says
    bill_started_at: float | None = None
    bill_ended_at: float | None = None
    cost_final: bool = False  # cost_usd is the provider's final figure, not an estimate
    duplicate_cost_usd: float = 0.0  # paid for duplicate machines that carried this attempt's name
    # a move (orchestrator/moving.py): what restoring the checkpoint here cost, egress plus the
    # restore's machine time, as estimated when the move was chosen; None: not a move
    transfer_cost_usd: float | None = None
    version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # see JobRow.version
    changed: int = Field(default=0, sa_type=BigInteger, index=True, sa_column_kwargs={"server_default": "0"})  # see JobRow


class VolumeRow(SQLModel, table=True):
    __tablename__ = "volumes"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    size_gb: int
    mount_path: str = Field(max_length=255)
    provider: str | None = Field(default=None, max_length=32)  # None until first placed
    region: str | None = Field(default=None, max_length=64)
    provider_volume_id: str | None = Field(default=None, max_length=128)
    created_at: float
    # a deletion in progress (`gpuhop volume rm`, retention): who claimed it and when. While set, a
    # submit naming the volume is refused; a claim older than its lease may be taken over (the
    # deleter died), see Store.begin_volume_delete
    deleting_since: float | None = None
    deleting_token: str | None = Field(default=None, max_length=32)
    # how big the checkpoint a move must restore is, when something measured it (the object-store
    # sync); None: moves are priced at size_gb
    checkpoint_gb: float | None = None
    # a move in progress (store.moves): a new provider volume at move_provider/move_region, for the
    # attempt named move_attempt. Recorded before the volume is made, so that whatever a crash
    # interrupts, both the old and the new volume are on the books: the move is committed (the old
    # one retired) once that attempt launched, or aborted (the new one retired) if it never did
    move_provider: str | None = Field(default=None, max_length=32)
    move_region: str | None = Field(default=None, max_length=64)
    move_volume_id: str | None = Field(default=None, max_length=128)
    move_attempt: str | None = Field(default=None, max_length=96)


class RetiredVolumeRow(SQLModel, table=True):
    """A provider volume no volume row uses any more (left behind by a move, or made for a move
    that never launched): deleted at its provider by the engine's sweep, then forgotten. Storage
    bills every month, so it stays on the books until its provider confirms it is gone."""

    __tablename__ = "retired_volumes"

    id: int | None = Field(default=None, primary_key=True)
    volume_name: str = Field(max_length=64)
    provider: str = Field(max_length=32)
    region: str = Field(default="", max_length=64)
    provider_volume_id: str = Field(max_length=128)
    reason: str = Field(default="", max_length=512)
    created_at: float


class CapacityGapRow(SQLModel, table=True):
    """A stretch of time when a place (provider, region, GPU model; "" for CPU-only) offered no
    capacity, from the daemon's offer refreshes: what the expected wait there is learned from."""

    __tablename__ = "capacity_gaps"

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(max_length=32)
    region: str = Field(default="", max_length=64)
    gpu: str = Field(default="", max_length=32)
    started_at: float = Field(index=True)
    ended_at: float | None = None  # None: still no capacity


class EventRow(SQLModel, table=True):
    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=32)
    attempt: int | None = None
    at: float = Field(index=True)  # updated when a repeat is folded into this row; pruning reads it
    kind: str = Field(max_length=32)
    message: str = Field(max_length=2048)
    repeats: int = 0  # how many more times the same thing happened right after (see Store.add_event)


class PreemptionStatsRow(SQLModel, table=True):
    """What ended attempts taught about a kind of capacity, kept up to date in the transaction
    that ends each attempt, so placement reads one row per (provider, capacity) instead of every
    attempt ever made. Live attempts' hours are added at read time."""

    __tablename__ = "preemption_stats"

    provider: str = Field(primary_key=True, max_length=32)
    capacity: str = Field(primary_key=True, max_length=16)
    preemptions: int = 0
    hours: float = 0.0  # hours run by ended attempts (from running, else launched, to ended)


class ReplicaRow(SQLModel, table=True):
    """A daemon sharing the database, and its lease: the jobs it owns (`jobs.lease_owner`) are
    its while `expires_at` is ahead, renewed by its heartbeat. `epoch` is the fencing token:
    bumped each time the replica (re)registers, and checked in the transaction of every write
    its engine makes, so a process that lost its lease (or was replaced) cannot write."""

    __tablename__ = "replicas"

    id: str = Field(primary_key=True, max_length=64)
    epoch: int
    url: str = Field(max_length=255)  # where its API answers (agents fail over to it)
    started_at: float
    heartbeat_at: float
    expires_at: float


class ClusterSecretRow(SQLModel, table=True):
    """Secrets every replica must hold alike (the API token, the agent-token key): the first
    replica to start writes them, the others read them."""

    __tablename__ = "cluster_secrets"

    name: str = Field(primary_key=True, max_length=32)
    value: str = Field(max_length=255)


class WorkdirRow(SQLModel, table=True):
    """A job's working directory as uploaded (orchestrator.workdir): a tar.gz keyed by its sha256.
    In the database rather than the state dir so that every replica sharing it can hand the
    archive to any job's agent. Written once, never changed (content-addressed)."""

    __tablename__ = "workdirs"

    sha256: str = Field(primary_key=True, max_length=64)
    size: int  # bytes of the archive
    unpacked_size: int  # what it unpacks to
    data: bytes = Field(sa_type=LargeBinary)
    created_at: float


class ChangeCounterRow(SQLModel, table=True):
    """SQLite's position in commit order for the change feed (migration 0009, store/feed.py):
    one row, bumped by the triggers that stamp jobs and attempts. Unused on PostgreSQL, which
    stamps with transaction ids."""

    __tablename__ = "gpuhop_changes"

    n: int = Field(sa_type=BigInteger, primary_key=True)
