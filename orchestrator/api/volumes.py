"""GET /v1/volumes: every network volume gpuhop made, where it lives, which jobs used it, and
what it costs to keep (providers bill storage whether or not a job runs, so a forgotten volume
is money spent every month)."""

from __future__ import annotations

import time

from aiohttp import web

from adapters.base import VolumeSupport
from orchestrator.api.app import CTX
from orchestrator.api.views import VolumeOut, Volumes, when, wire

SECONDS_PER_MONTH = 30 * 86400  # providers price storage per month of 30 days (720 h)


async def list_volumes(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    rows = await ctx.store.run(ctx.store.list_volumes)
    usage = await ctx.store.run(ctx.store.volume_usage)
    now = time.time()
    out = []
    for v in rows:
        adapter = ctx.engine.adapters.get(v.provider or "")
        monthly = adapter.storage_usd_per_month(v.size_gb) if isinstance(adapter, VolumeSupport) and v.provider_volume_id else 0.0
        jobs, active, last = usage.get(v.name, (0, None, None))
        out.append(VolumeOut(
            name=v.name, size_gb=v.size_gb, mount_path=v.mount_path, provider=v.provider, region=v.region,
            volume_id=v.provider_volume_id, created_at=when(v.created_at), jobs=jobs, active_job=active,
            last_used_at=when(last), storage_usd_per_month=round(monthly, 4),
            storage_usd_so_far=round(monthly * max(0.0, now - v.created_at) / SECONDS_PER_MONTH, 6),
        ))
    total = round(sum(v.storage_usd_per_month for v in out), 4)
    return web.json_response(wire(Volumes(volumes=out, storage_usd_per_month=total)))


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/volumes", list_volumes, allow_head=False)
