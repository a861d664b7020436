"""The user-facing routes under /v1: submit, list, show, cancel, logs, offers, plus /healthz,
/metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from orchestrator import metrics
from orchestrator.api.app import CTX, error
from orchestrator.api.openapi import openapi_document
from orchestrator.api.views import job_json
from orchestrator.models import JobSpec, JobStatus
from orchestrator.placement import rank_offers_for_display
from orchestrator.store import Conflict
from orchestrator.store.tables import AttemptRow

JOB_ID_CHARS = set("0123456789abcdef")


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


async def read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=0,
                                            text="request body is larger than 1 MiB") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=f"request body is not valid JSON: {exc}") from None


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not (1 <= len(job_id) <= 32) or not set(job_id) <= JOB_ID_CHARS:
        raise web.HTTPNotFound(text=f"no job {job_id[:40]!r}")
    return job_id


async def healthz(request: web.Request) -> web.Response:
    engine = request.app[CTX].engine
    providers = {n: {"ok": h.ok, "error": h.error} for n, h in engine.health.items()}
    ok = engine.healthy()
    return web.json_response({"ok": ok, "providers": providers}, status=200 if ok else 503)


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
    for _ in range(5):
        job_id = secrets.token_hex(4)
        if await ctx.store.run(ctx.store.get_job, job_id) is None:
            break
    try:
        job = await ctx.store.run(ctx.store.create_job, job_id, spec)
    except Conflict as exc:
        return error(409, "conflict", str(exc))
    ctx.engine.hint()
    return web.json_response(job_json(job, []), status=201)


async def list_jobs(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    statuses = [s for s in request.query.get("status", "").split(",") if s]
    valid = {s.value for s in JobStatus}
    bad = [s for s in statuses if s not in valid]
    if bad:
        return error(400, "invalid_query", f"status: {bad[0][:40]!r} is not one of {', '.join(sorted(valid))}")
    try:
        limit = int(request.query.get("limit", "200"))
    except ValueError:
        return error(400, "invalid_query", "limit must be a whole number")
    if not 1 <= limit <= 1000:
        return error(400, "invalid_query", "limit must be between 1 and 1000")
    jobs = await ctx.store.run(ctx.store.list_jobs, statuses or None, limit)
    attempts = await ctx.store.run(ctx.store.attempts_for, [j.id for j in jobs])
    return web.json_response({"jobs": [job_json(j, attempts.get(j.id, [])) for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    job_id = _job_id(request)
    job = await ctx.store.run(ctx.store.get_job, job_id)
    if job is None:
        return error(404, "not_found", f"no job {job_id}")
    attempts = await ctx.store.run(ctx.store.attempts, job_id)
    events = await ctx.store.run(ctx.store.events, job_id)
    volume = await ctx.store.run(ctx.store.volume, job.volume_name) if job.volume_name else None
    return web.json_response(job_json(job, attempts, events, volume))


async def cancel(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    job_id = _job_id(request)
    job = await ctx.store.run(ctx.store.request_cancel, job_id)
    if job is None:
        return error(404, "not_found", f"no job {job_id}")
    ctx.engine.hint()
    attempts = await ctx.store.run(ctx.store.attempts, job_id)
    return web.json_response(job_json(job, attempts), status=202)


def _log_files(logs_dir: Path, attempts: list[AttemptRow], number: int | None) -> list[tuple[AttemptRow, Path]]:
    return [(a, logs_dir / f"{a.name}.log") for a in attempts if number is None or a.number == number]


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(1024 * 1024)
    except FileNotFoundError:
        return b""


def _tail(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return data
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


async def logs(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    job_id = _job_id(request)
    job = await ctx.store.run(ctx.store.get_job, job_id)
    if job is None:
        return error(404, "not_found", f"no job {job_id}")
    try:
        tail = int(request.query.get("tail", "0"))
        number = int(request.query["attempt"]) if "attempt" in request.query else None
    except ValueError:
        return error(400, "invalid_query", "tail and attempt must be whole numbers")
    if tail < 0 or tail > 1_000_000:
        return error(400, "invalid_query", "tail must be between 0 and 1000000")
    follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
    attempts = await ctx.store.run(ctx.store.attempts, job_id)
    if number is not None and not any(a.number == number for a in attempts):
        return error(404, "not_found", f"job {job_id} has no attempt {number}")

    def read_all() -> tuple[bytes, dict[str, int]]:
        chunks, offsets = [], {}
        for a, path in _log_files(ctx.logs_dir, attempts, number):
            data = path.read_bytes() if path.exists() else b""
            offsets[a.name] = len(data)
            if len(attempts) > 1 and number is None:
                chunks.append(f"--- attempt {a.number} on {a.provider} {a.region} ---\n".encode())
            chunks.append(data)
        return b"".join(chunks), offsets

    data, offsets = await asyncio.to_thread(read_all)
    if not follow:
        return web.Response(body=_tail(data, tail), content_type="text/plain", charset="utf-8")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    await resp.write(_tail(data, tail))
    while True:
        await asyncio.sleep(0.5)
        job = await ctx.store.run(ctx.store.get_job, job_id)
        attempts = await ctx.store.run(ctx.store.attempts, job_id)
        for a, path in _log_files(ctx.logs_dir, attempts, number):
            if a.name not in offsets:
                offsets[a.name] = 0
                await resp.write(f"--- attempt {a.number} on {a.provider} {a.region} ---\n".encode())
            chunk = await asyncio.to_thread(_read_from, path, offsets[a.name])
            if chunk:
                offsets[a.name] += len(chunk)
                await resp.write(chunk)
        if job is None or JobStatus(job.status).terminal:
            break
    await resp.write_eof()
    return resp


async def offers(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    by_provider = await ctx.engine.offers()
    flat = [o for lst in by_provider.values() for o in lst]
    ranked = rank_offers_for_display(flat, ctx.engine.placement, await ctx.engine.rate_stats())
    return web.json_response({
        "offers": [
            {
                "provider": o.provider, "region": o.region, "gpu": o.gpu, "gpu_count": o.gpu_count,
                "vram_gb": o.vram_gb, "vcpu": o.vcpu, "memory_gb": o.memory_gb, "capacity": o.capacity.value,
                "price_per_hour": o.price_per_hour, "expected_cost_per_hour": round(cost, 4),
                "available": o.available, "supports_volumes": o.supports_volumes, "offer_id": o.offer_id,
            }
            for o, cost in ranked
        ],
        "providers": {n: {"ok": h.ok, "error": h.error} for n, h in ctx.engine.health.items()},
    })


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def metrics_view(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    counts = await ctx.store.run(ctx.store.counts_by_status)
    for status in JobStatus:
        metrics.JOBS.labels(status.value).set(counts.get(status.value, 0))
    return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_post("/v1/jobs/{job_id}/cancel", cancel)
    app.router.add_get("/v1/jobs/{job_id}/logs", logs)
    app.router.add_get("/v1/offers", offers)
