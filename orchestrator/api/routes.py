"""The user-facing routes under /v1: submit, list, show, cancel, logs, offers, plus /healthz,
/metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from orchestrator import costs, metrics
from orchestrator.api import follow, workdir_routes
from orchestrator.api.app import CTX, bearer, error
from orchestrator.api.body import read_json, validation_message
from orchestrator.api.cursor import decode_cursor, encode_cursor
from orchestrator.api.openapi import openapi_document
from orchestrator.api.views import (
    CostLine,
    Costs,
    Health,
    JobList,
    OfferOut,
    Offers,
    ProviderHealth,
    Status,
    job_out,
    respond,
)
from orchestrator.engine import attempt_view
from orchestrator.models import JobSpec, JobStatus, Offer
from orchestrator.placement import never_satisfiable, rank_offers_for_display
from orchestrator.reconcile import attempt_cost
from orchestrator.store import Conflict
from orchestrator.store.tables import AttemptRow
from orchestrator.volume_deletion import monthly_storage_usd

__all__ = ["read_json", "setup", "validation_message"]  # read_json: agent_routes' old import

JOB_ID_CHARS = set("0123456789abcdef")
_INT_RE = re.compile(r"-?[0-9]{1,9}")
FOLLOW_POLL_SECONDS = 1.0  # a local job writes its log file itself: look at it this often
FOLLOW_STATE_SECONDS = 2.0  # and at the job's state (new attempts, the end) this often, or when woken


def query_int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    """A whole-number query parameter, plain ASCII digits only, within [low, high]; else 400."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _INT_RE.fullmatch(raw) or not low <= int(raw) <= high:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number between {low} and {high}")
    return int(raw)


def query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false")
    if raw not in ("true", "false"):
        raise web.HTTPBadRequest(text=f"{name} must be true or false")
    return raw == "true"


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not (1 <= len(job_id) <= 32) or not set(job_id) <= JOB_ID_CHARS:
        shown = job_id[:40].encode("unicode_escape").decode("ascii")
        raise web.HTTPNotFound(text=f"no job '{shown}'")
    return job_id


def _health(request: web.Request) -> dict[str, ProviderHealth]:
    engine = request.app[CTX].engine
    return {n: ProviderHealth(ok=h.ok, error=h.error, suspended_until=h.suspended_until or None,
                              suspended_why=h.suspended_why or None) for n, h in engine.health.items()}


async def healthz(request: web.Request) -> web.Response:
    engine = request.app[CTX].engine
    ok = engine.healthy()
    age = round(time.time() - engine.last_tick_at, 3) if engine.last_tick_at else None
    body = Health(ok=ok, tick_age_seconds=age, ticks=engine.ticks, providers=_health(request))
    return respond(body, status=200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    engine = ctx.engine
    now = time.time()
    counts = await ctx.store.run(ctx.store.counts_by_status)
    body = Status(
        version=VERSION, started_at=datetime.fromtimestamp(engine.started_at, UTC),
        uptime_seconds=round(now - engine.started_at, 1), ok=engine.healthy(),
        tick_age_seconds=round(now - engine.last_tick_at, 3) if engine.last_tick_at else None,
        ticks=engine.ticks, providers=_health(request),
        jobs={s.value: counts.get(s.value, 0) for s in JobStatus},
        state_dir=str(engine.settings.state_dir), database=ctx.store.engine.dialect.name,
        replica=ctx.store.fence.replica_id if ctx.store.fence else "", leader=engine.leader,
        peers=list(engine.workers.peer_urls),
    )
    return respond(body)


_SINCE_RE = re.compile(r"([0-9]{1,6})([mhd])")
_UNIT = {"m": 60, "h": 3600, "d": 86400}


def _line(line: costs.Line) -> CostLine:
    saved = line.saved_usd
    return CostLine(key=line.key, cost_usd=round(line.cost_usd, 6), hours=round(line.hours, 4),
                    attempts=line.attempts,
                    on_demand_usd=None if line.on_demand_usd is None else round(line.on_demand_usd, 6),
                    saved_usd=None if saved is None else round(saved, 6))


async def costs_view(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    now = time.time()
    raw = request.query.get("since", "30d")
    if raw == "all":
        since = 0.0
    else:
        m = _SINCE_RE.fullmatch(raw)
        if not m:
            return error(400, "invalid_query", "since: a span such as 30m, 24h or 7d, or all")
        since = now - int(m.group(1)) * _UNIT[m.group(2)]
    by = request.query.get("by", "provider")
    if by not in costs.GROUPS:
        return error(400, "invalid_query", f"by: one of {', '.join(costs.GROUPS)}")
    rows = await ctx.store.run(ctx.store.attempts_since, since)
    spends = [costs.Spend(row.job_id, name, attempt_view(row), row.capacity, row.gpu, row.gpu_count)
              for row, name in rows]
    known = ctx.engine.observer.known_offers()
    report = costs.summarize(spends, by, since, now,
                             costs.cheapest_on_demand(o for lst in known.values() for o in lst))
    body = Costs(by=by, since=datetime.fromtimestamp(since, UTC), lines=[_line(x) for x in report.lines],
                 total=_line(report.total))
    return respond(body)


async def submit(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await read_json(request)
    if not isinstance(body, dict):
        return error(400, "invalid_spec", "the job spec must be a JSON object")
    try:
        spec = JobSpec.model_validate(body)
    except ValidationError as exc:
        return error(422, "invalid_spec", validation_message(exc))
    known = set(ctx.engine.adapters)
    unknown = [p for p in (spec.placement.providers or []) if p not in known]
    if unknown:
        return error(422, "invalid_spec", f"placement.providers: {', '.join(unknown)} not configured "
                                          f"(configured: {', '.join(sorted(known))})")
    if spec.volume is not None and spec.volume.sync == "object-store" and ctx.objects is None:
        return error(422, "no_object_store", "volume.sync = \"object-store\" needs object storage: add a "
                                             "[storage] table (endpoint_url, bucket, ...) to the daemon's "
                                             "configuration and restart it, or submit with sync = \"none\"")
    if not query_bool(request, "force"):
        why = _never_runs(ctx.engine.observer.known_offers(), spec, known)
        if why is not None:
            return error(422, "unsatisfiable", f"{why}. Change [resources] or [placement], or submit with "
                                               f"--force (?force=true) to queue it anyway")
    refusal = await workdir_routes.refuse_unknown(ctx, spec)
    if refusal is not None:
        return refusal
    reuse_volume = query_bool(request, "reuse_volume")
    for tries_left in range(4, -1, -1):
        # 32 random bits: the primary key catches the rare collision, and a new id is drawn
        job_id = secrets.token_hex(4)
        try:
            job = await ctx.submits.create(job_id, spec, reuse_volume)
            break
        except Conflict as exc:
            if exc.code != "job_exists" or not tries_left:
                return error(409, exc.code, str(exc))
    ctx.engine.hint()
    return respond(job_out(job, [], spec=spec), status=201)


def _never_runs(known_offers: dict[str, list[Offer]], spec: JobSpec, configured: set[str]) -> str | None:
    """Why no provider could ever run the job, judged on the offers each provider last gave;
    None (accept) as soon as a provider the job may use has not answered yet."""
    allowed = [p for p in configured if spec.placement.providers is None or p in spec.placement.providers]
    if any(p not in known_offers for p in allowed):
        return None
    return never_satisfiable(spec, [o for p in allowed for o in known_offers[p]])


STATUS_VALUES = [s.value for s in JobStatus]
try:
    VERSION = version("gpuhop")
except PackageNotFoundError:  # run from a checkout that was not installed
    VERSION = "unknown"


async def list_jobs(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    statuses = [s for s in request.query.get("status", "").split(",") if s]
    bad = [s for s in statuses if s not in STATUS_VALUES]
    if bad:
        shown = bad[0][:40].encode("unicode_escape").decode("ascii")
        return error(400, "invalid_query", f"status: '{shown}' is not one of {', '.join(sorted(STATUS_VALUES))}")
    limit = query_int(request, "limit", 200, 1, 1000) or 200
    raw_cursor = request.query.get("cursor")
    before = None
    if raw_cursor is not None:
        before = decode_cursor(raw_cursor)
        if before is None:
            return error(400, "invalid_query", "cursor: not a cursor this API gave out (use next_cursor as it is)")
    jobs = await ctx.store.run(ctx.store.list_jobs, statuses or None, limit + 1, before)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    attempts = await ctx.store.run(ctx.store.attempts_for, [j.id for j in jobs])
    next_cursor = encode_cursor(jobs[-1].created_at, jobs[-1].id) if more and jobs else None
    # serialised by pydantic itself: json.dumps of model_dump was a third of a page's time
    page = JobList(jobs=[job_out(j, attempts.get(j.id, [])) for j in jobs], next_cursor=next_cursor)
    return web.Response(body=page.model_dump_json(), content_type="application/json")


async def get_job(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    job_id = _job_id(request)
    job = await ctx.store.run(ctx.store.get_job, job_id)
    if job is None:
        return error(404, "not_found", f"no job {job_id}")
    attempts = await ctx.store.run(ctx.store.attempts, job_id)
    events = await ctx.store.run(ctx.store.events, job_id)
    volume = await ctx.store.run(ctx.store.volume, job.volume_name) if job.volume_name else None
    monthly = monthly_storage_usd(volume, ctx.engine.adapters) if volume is not None else 0.0
    return respond(job_out(job, attempts, events, volume, volume_usd_per_month=monthly))


async def cancel(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    job_id = _job_id(request)
    job = await ctx.store.run(ctx.store.request_cancel, job_id)
    if job is None:
        return error(404, "not_found", f"no job {job_id}")
    ctx.engine.hint()
    ctx.followers.notify(job_id)
    attempts = await ctx.store.run(ctx.store.attempts, job_id)
    return respond(job_out(job, attempts), status=202)


def log_path(logs_dir: Path, attempt_name: str) -> Path:
    return logs_dir / f"{attempt_name}.log"


def _log_files(logs_dir: Path, attempts: list[AttemptRow], number: int | None) -> list[tuple[AttemptRow, Path]]:
    return [(a, log_path(logs_dir, a.name)) for a in attempts if number is None or a.number == number]


def _read_from(path: Path, offset: int, limit: int = 1024 * 1024) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(limit)
    except FileNotFoundError:
        return b""


def _tail(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return data
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def _header(a: AttemptRow) -> bytes:
    return f"--- attempt {a.number} on {a.provider} {a.region} ---\n".encode()


def _new_output(files: list[tuple[AttemptRow, Path]], offsets: dict[str, int], headers: bool) -> bytes:
    """What was appended to each attempt's log since `offsets` (updated), in attempt order."""
    out: list[bytes] = []
    for a, path in files:
        if a.name not in offsets:
            offsets[a.name] = 0
            if headers:
                out.append(_header(a))
        while True:
            chunk = _read_from(path, offsets[a.name])
            if not chunk:
                break
            offsets[a.name] += len(chunk)
            out.append(chunk)
    return b"".join(out)


async def logs(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    job_id = _job_id(request)
    tail = query_int(request, "tail", 0, 0, 1_000_000) or 0
    number = query_int(request, "attempt", None, 1, 1_000_000)
    follow_ = query_bool(request, "follow")
    job = await ctx.store.run(ctx.store.get_job, job_id)
    if job is None:
        return error(404, "not_found", f"no job {job_id}")
    attempts = await ctx.store.run(ctx.store.attempts, job_id)
    if number is not None and not any(a.number == number for a in attempts):
        return error(404, "not_found", f"job {job_id} has no attempt {number}")
    headers = number is None and len(attempts) > 1
    offsets: dict[str, int] = {}
    data = await asyncio.to_thread(_new_output, _log_files(ctx.logs_dir, attempts, number), offsets, headers)
    if not follow_:
        return web.Response(body=_tail(data, tail), content_type="text/plain", charset="utf-8")
    try:
        follower = ctx.followers.add(request, job_id, bearer(request) or "")
    except follow.TooManyFollowers as exc:
        return error(429, "too_many_followers", str(exc), headers={"Retry-After": "5"})
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    try:
        await resp.prepare(request)
        await resp.write(_tail(data, tail))
        next_state = time.monotonic() + FOLLOW_STATE_SECONDS
        while not JobStatus(job.status).terminal:
            woken = await follow.wait(follower, FOLLOW_POLL_SECONDS)
            if follower.gone:
                return resp  # the client left: stop now, quietly
            if ctx.followers.closing:
                break  # the daemon is stopping: end the stream cleanly (the CLI reconnects)
            if woken or time.monotonic() >= next_state:
                next_state = time.monotonic() + FOLLOW_STATE_SECONDS
                fresh = await ctx.store.run(ctx.store.get_job, job_id)
                if fresh is None:
                    break
                job = fresh
                attempts = await ctx.store.run(ctx.store.attempts, job_id)
                headers = headers or (number is None and len(attempts) > 1)
            chunk = await asyncio.to_thread(_new_output, _log_files(ctx.logs_dir, attempts, number), offsets,
                                            headers)
            if chunk:
                await resp.write(chunk)
        await resp.write_eof()
    except ConnectionError:
        pass  # the client left while we wrote
    finally:
        ctx.followers.remove(follower)
    return resp


async def offers(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    by_provider = await ctx.engine.offers()
    flat = [o for lst in by_provider.values() for o in lst]
    ranked = rank_offers_for_display(flat, ctx.engine.placement, await ctx.engine.rate_stats())
    return respond(Offers(
        offers=[
            OfferOut(
                provider=o.provider, region=o.region, gpu=o.gpu, gpu_count=o.gpu_count, vram_gb=o.vram_gb,
                vcpu=o.vcpu, memory_gb=o.memory_gb, capacity=o.capacity, price_per_hour=o.price_per_hour,
                expected_cost_per_hour=round(cost, 4), available=o.available,
                supports_volumes=o.supports_volumes, offer_id=o.offer_id,
            )
            for o, cost in ranked
        ],
        providers=_health(request),
    ))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(tuple(sorted(request.app[CTX].engine.adapters))))


async def metrics_view(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    counts = await ctx.store.run(ctx.store.counts_by_status)
    for status in JobStatus:
        metrics.JOBS.labels(status.value).set(counts.get(status.value, 0))
    spent = await ctx.store.run(ctx.store.ended_cost_by_capacity)
    now = time.time()
    live = await ctx.store.run(ctx.store.live_attempts)
    for row in live:
        key = (row.provider, row.capacity)
        spent[key] = spent.get(key, 0.0) + attempt_cost(attempt_view(row), now)
    metrics.SPEND.values = spent
    return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/metrics", metrics_view, allow_head=False)
    app.router.add_get("/v1/openapi.json", openapi, allow_head=False)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs, allow_head=False)
    app.router.add_get("/v1/jobs/{job_id}", get_job, allow_head=False)
    app.router.add_post("/v1/jobs/{job_id}/cancel", cancel)
    app.router.add_get("/v1/jobs/{job_id}/logs", logs, allow_head=False)
    app.router.add_get("/v1/offers", offers, allow_head=False)
    app.router.add_get("/v1/status", status, allow_head=False)
    app.router.add_get("/v1/costs", costs_view, allow_head=False)
