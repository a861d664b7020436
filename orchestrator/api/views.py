"""How everything the API returns looks on the wire, as pydantic models: the handlers build these
and serialize them, and the OpenAPI document's response schemas are generated from the same
models, so the document cannot drift from what the server sends (`gpuhop show --json` prints the
same). Times are ISO 8601 UTC; costs are USD, live attempts priced so far."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from orchestrator import reconcile
from orchestrator.engine import attempt_view
from orchestrator.models import AttemptStatus, CapacityType, EndReason, JobSpec, JobStatus
from orchestrator.store import AttemptRow, EventRow, JobRow, VolumeRow


class _Out(BaseModel):
    # every field is always sent (null when unknown): the document marks them all required
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class ErrorDetail(_Out):
    code: str
    message: str


class Error(BaseModel):
    """Every 4xx and 5xx: what was wrong, in words."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
    expected_offset: int | None = None  # 409 on a log chunk: where the next chunk must start


class Attempt(_Out):
    number: int
    name: str
    provider: str
    region: str
    offer_id: str
    capacity: str
    gpu: str | None
    gpu_count: int
    price_per_hour: float
    instance_id: str | None
    volume_id: str | None
    status: AttemptStatus
    end_reason: EndReason | None
    detail: str
    exit_code: int | None
    exit_signal: int | None
    cost_usd: float
    cost_final: bool = Field(
        default=False, description="cost_usd is the provider's final bill; false while the attempt runs and "
        "while the bill of its stopped machine is awaited (until then: price x time, an estimate)")
    placement_reason: str
    transfer_cost_usd: float | None = Field(
        default=None, description="a move away from the volume's place: egress plus restore time, as estimated "
        "when the move was chosen; null when the attempt did not move")
    created_at: datetime | None
    launched_at: datetime | None
    running_at: datetime | None
    ended_at: datetime | None
    last_heartbeat_at: datetime | None
    interruption_at: datetime | None


class Event(_Out):
    at: datetime | None
    kind: str
    attempt: int | None
    message: str
    repeats: int = Field(default=0, ge=0, description="how many more times it happened right after (folded into this event)")


class Volume(_Out):
    name: str
    size_gb: int
    mount_path: str
    provider: str | None
    region: str | None
    volume_id: str | None
    storage_usd_per_month: float = Field(
        default=0.0, ge=0, description="what the volume costs per month while it exists, job or no job")


class Job(_Out):
    id: str
    name: str
    status: JobStatus
    end_reason: str | None
    message: str
    cost_usd: float
    cost_final: bool = Field(default=False, description="every attempt's cost is final (see Attempt.cost_final)")
    attempt_count: int
    relaunches: int
    retries: int
    created_at: datetime | None
    updated_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool
    spec: JobSpec
    attempts: list[Attempt]
    volume: Volume | None = None  # only in GET /v1/jobs/{id}, when the job has a volume
    events: list[Event] | None = None  # only in GET /v1/jobs/{id}


class JobList(_Out):
    jobs: list[Job]
    next_cursor: str | None = Field(
        default=None, description="pass as ?cursor= for the next page (older jobs); null on the last page")


class ProviderHealth(_Out):
    ok: bool
    error: str | None
    suspended_until: float | None = Field(
        default=None, description="no launches on this provider before this UNIX time (the account was refused)")
    suspended_why: str | None = None


class Health(_Out):
    ok: bool = Field(description="the reconcile loop is alive (ticks keep coming), whatever the providers do")
    tick_age_seconds: float | None = Field(description="seconds since the last tick ended; null before the first")
    ticks: int = Field(ge=0, description="ticks since this daemon started")
    providers: dict[str, ProviderHealth]


class CostLine(_Out):
    key: str = Field(description="the provider and capacity, the job (id and name) or the day (UTC)")
    cost_usd: float
    hours: float = Field(description="machine hours billed, or running so far")
    attempts: int
    on_demand_usd: float | None = Field(
        description="the same hours at the cheapest on-demand price of the same GPU known now; "
                    "null when a GPU has no on-demand offer to compare with")
    saved_usd: float | None


class Costs(_Out):
    by: str
    since: datetime
    lines: list[CostLine]
    total: CostLine


class Status(_Out):
    version: str = Field(description="gpuhop's version")
    started_at: datetime = Field(description="when this daemon process started")
    uptime_seconds: float = Field(ge=0)
    ok: bool = Field(description="the reconcile loop is alive, as /healthz says")
    tick_age_seconds: float | None
    ticks: int = Field(ge=0)
    providers: dict[str, ProviderHealth]
    jobs: dict[str, int] = Field(description="how many jobs are in each status")
    state_dir: str
    database: str = Field(description="the database's kind (sqlite or postgresql), never its credentials")
    replica: str = Field(default="", description="this daemon's replica id among those sharing the database")
    leader: bool = Field(default=True, description="this replica reaps machines of ended jobs (the lowest live id)")
    peers: list[str] = Field(default_factory=list, description="the other live replicas' URLs")


class OfferOut(_Out):
    provider: str
    region: str
    gpu: str | None
    gpu_count: int
    vram_gb: int
    vcpu: int
    memory_gb: int
    capacity: CapacityType
    price_per_hour: float
    expected_cost_per_hour: float
    available: int
    supports_volumes: bool
    offer_id: str


class Offers(_Out):
    offers: list[OfferOut]
    providers: dict[str, ProviderHealth]


class VolumeOut(_Out):
    name: str
    size_gb: int
    mount_path: str
    provider: str | None = Field(description="null until a job's first launch created it")
    region: str | None
    volume_id: str | None = Field(description="the provider's id for it")
    created_at: datetime | None
    jobs: int = Field(ge=0, description="jobs that named this volume")
    active_job: str | None = Field(description="the job using it now (one at most), or null")
    last_used_at: datetime | None = Field(description="when a job that named it last changed")
    storage_usd_per_month: float = Field(ge=0, description="what it costs per month while it exists")
    storage_usd_so_far: float = Field(ge=0, description="its storage cost so far, counted from when gpuhop recorded it (an upper bound: before the first launch it may not exist yet)")
    checkpoint_gb: float | None = Field(
        default=None, description="the newest checkpoint's size, when the object-store sync measured it")
    moving_to: str | None = Field(
        default=None, description="a move in progress: the new provider volume's place (and id once made), "
        "which bills too until the move is committed or given up")


class RetiredVolumeOut(_Out):
    volume_name: str = Field(description="the volume it belonged to")
    provider: str
    region: str
    volume_id: str = Field(description="the provider's id for it")
    reason: str = Field(description="why it was retired (a move left it, or a move that never launched made it)")
    retired_at: datetime | None
    storage_usd_per_month: float | None = Field(
        description="what it costs per month until its provider confirms it gone; null when its size is unknown")


class Volumes(_Out):
    volumes: list[VolumeOut]
    retired: list[RetiredVolumeOut] = Field(
        default_factory=list, description="provider volumes no volume uses any more, being deleted by the daemon")
    storage_usd_per_month: float = Field(
        ge=0, description="all volumes together, with moves in progress and retired volumes not deleted yet")


class DeletedVolume(_Out):
    name: str
    provider: str | None = Field(description="where it was; null: it was never created on a provider")
    region: str | None
    volume_id: str | None
    message: str


class AgentAck(_Out):
    ok: Literal[True]
    attempt_status: AttemptStatus
    log_size: int | None = None  # bytes of this attempt's log the daemon holds
    # where to report next: every live replica's report URL, this one first (the agent fails
    # over along this list when a post fails, so replicas started after its launch count too)
    report_urls: list[str] = []


def when(ts: float | None) -> datetime | None:
    """A stored UNIX time as an aware UTC datetime, whole seconds (serialized `...Z`)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(int(ts), UTC)


def attempt_out(row: AttemptRow, now: float) -> Attempt:
    return Attempt(
        number=row.number, name=row.name, provider=row.provider, region=row.region, offer_id=row.offer_id,
        capacity=row.capacity, gpu=row.gpu, gpu_count=row.gpu_count, price_per_hour=row.price_per_hour,
        instance_id=row.instance_id, volume_id=row.volume_id, status=AttemptStatus(row.status),
        end_reason=EndReason(row.end_reason) if row.end_reason else None, detail=row.detail,
        exit_code=row.exit_code, exit_signal=row.exit_signal,
        cost_usd=round(reconcile.attempt_cost(attempt_view(row), now), 6),
        cost_final=row.cost_final or (row.status == AttemptStatus.ENDED.value and not row.instance_id),
        placement_reason=row.placement_reason, transfer_cost_usd=row.transfer_cost_usd,
        created_at=when(row.created_at),
        launched_at=when(row.launched_at), running_at=when(row.running_at), ended_at=when(row.ended_at),
        last_heartbeat_at=when(row.last_heartbeat_at), interruption_at=when(row.interruption_at),
    )


def job_out(
    job: JobRow,
    attempts: list[AttemptRow],
    events: list[EventRow] | None = None,
    volume: VolumeRow | None = None,
    now: float | None = None,
    volume_usd_per_month: float = 0.0,
    spec: JobSpec | None = None,
) -> Job:
    """The job as the API shows it (`spec`: the job's spec when the caller has it parsed)."""
    now = now or time.time()
    rows = [attempt_out(a, now) for a in attempts]
    return Job(
        id=job.id, name=job.name, status=JobStatus(job.status), end_reason=job.end_reason, message=job.message,
        cost_usd=round(sum(a.cost_usd for a in rows), 6), cost_final=all(a.cost_final for a in rows),
        attempt_count=len(rows), relaunches=job.relaunches,
        retries=job.retries, created_at=when(job.created_at), updated_at=when(job.updated_at),
        finished_at=when(job.finished_at), cancel_requested=job.cancel_requested,
        spec=spec if spec is not None else JobSpec.model_validate_json(job.spec_json), attempts=rows,
        volume=None if volume is None else Volume(
            name=volume.name, size_gb=volume.size_gb, mount_path=volume.mount_path, provider=volume.provider,
            region=volume.region, volume_id=volume.provider_volume_id,
            storage_usd_per_month=round(volume_usd_per_month, 4),
        ),
        events=None if events is None else [
            Event(at=when(e.at), kind=e.kind, attempt=e.attempt, message=e.message, repeats=e.repeats)
            for e in events
        ],
    )


def respond(model: BaseModel, status: int = 200) -> web.Response:
    """A response model as the HTTP answer, serialised by pydantic itself (json.dumps of
    `wire`'s output cost three times as much on a page of jobs, issue 9)."""
    return web.Response(body=model.model_dump_json(), status=status, content_type="application/json")


def wire(model: BaseModel) -> object:
    """A response model as JSON-ready data: what every handler sends."""
    return model.model_dump(mode="json", exclude_none=False)
