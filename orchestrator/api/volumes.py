"""Network volumes as objects of their own: GET /v1/volumes lists every volume gpuhop made, where
it lives, which jobs used it and what it costs to keep (providers bill storage whether or not a
job runs, so a forgotten volume is money spent every month); DELETE /v1/volumes/{name} deletes
one, at its provider and then here (orchestrator.volume_deletion).

DELETE answers when the provider has answered: 200 once the volume is gone, 409 while a job that
has not ended uses it (or another deletion is under way), 502 when the provider refused (503
with Retry-After when it asks to be called later); on 502/503 the volume and its row are kept.
A synchronous answer rather than 202: a deletion is one provider call, and the caller learns at
once whether storage stopped billing."""

from __future__ import annotations

import time

from aiohttp import web
from pydantic import ValidationError

from orchestrator.api.app import CTX, error
from orchestrator.api.views import (
    DeletedVolume,
    RetiredVolumeOut,
    VolumeOut,
    Volumes,
    respond,
    when,
)
from orchestrator.models import VolumeSpec
from orchestrator.store import Conflict
from orchestrator.volume_deletion import (
    DeleteFailed,
    delete_volume,
    monthly_storage_usd,
    storage_usd,
    where,
)

SECONDS_PER_MONTH = 30 * 86400  # providers price storage per month of 30 days (720 h)


async def list_volumes(request: web.Request) -> web.Response:
    """Every volume, and every provider volume still billing that no volume uses: a move's new
    volume while the move is under way, and retired ones the daemon is deleting (a move left
    them behind, or made them for an attempt that never launched). All of it is storage paid
    for each month, so all of it is in the total."""
    ctx = request.app[CTX]
    adapters = ctx.engine.adapters
    rows = await ctx.store.run(ctx.store.list_volumes)
    usage = await ctx.store.run(ctx.store.volume_usage)
    retired = await ctx.store.run(ctx.store.retired_volumes)
    now = time.time()
    out = []
    total = 0.0
    for v in rows:
        monthly = monthly_storage_usd(v, adapters)
        total += monthly
        moving = None
        if v.move_attempt is not None and v.move_provider:
            moving = f"{v.move_provider} {v.move_region or ''}".strip() + (f" ({v.move_volume_id})" if v.move_volume_id else "")
            total += storage_usd(adapters, v.move_provider, v.size_gb) or 0.0
        jobs, active, last = usage.get(v.name, (0, None, None))
        out.append(VolumeOut(
            name=v.name, size_gb=v.size_gb, mount_path=v.mount_path, provider=v.provider, region=v.region,
            volume_id=v.provider_volume_id, created_at=when(v.created_at), jobs=jobs, active_job=active,
            last_used_at=when(last), storage_usd_per_month=round(monthly, 4),
            storage_usd_so_far=round(monthly * max(0.0, now - v.created_at) / SECONDS_PER_MONTH, 6),
            checkpoint_gb=v.checkpoint_gb, moving_to=moving,
        ))
    sizes = {v.name: v.size_gb for v in rows}
    gone = []
    for r in retired:
        size = sizes.get(r.volume_name)  # the same size as the volume it belonged to
        monthly_r = None if size is None else storage_usd(adapters, r.provider, size)
        total += monthly_r or 0.0
        gone.append(RetiredVolumeOut(
            volume_name=r.volume_name, provider=r.provider, region=r.region, volume_id=r.provider_volume_id,
            reason=r.reason, retired_at=when(r.created_at),
            storage_usd_per_month=None if monthly_r is None else round(monthly_r, 4)))
    return respond(Volumes(volumes=out, retired=gone, storage_usd_per_month=round(total, 4)))


async def remove_volume(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name = request.match_info["name"]
    try:
        VolumeSpec(name=name)  # the names a job may give its volume: nothing else can exist
    except ValidationError:
        shown = name[:70].encode("unicode_escape").decode("ascii")
        return error(404, "not_found", f"no volume '{shown}'")
    try:
        vol = await delete_volume(ctx.store, ctx.engine.adapters, name, "deleted on request (DELETE /v1/volumes)",
                                  objects=ctx.objects)
    except Conflict as exc:
        return error(409, exc.code, str(exc))
    except DeleteFailed as exc:
        headers = {"Retry-After": str(round(exc.retry_after))} if exc.retry_after else None
        return error(exc.status, "provider_failed" if exc.status == 502 else "provider_unavailable", str(exc),
                     headers=headers)
    if vol is None:
        return error(404, "not_found", f"no volume {name!r}; `gpuhop volumes` lists them")
    message = (f"deleted volume {name!r} ({where(vol)})" if vol.provider
               else f"forgot volume {name!r}: no job had created it on a provider yet")
    return respond(DeletedVolume(name=name, provider=vol.provider, region=vol.region,
                                                volume_id=vol.provider_volume_id, message=message))


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/volumes", list_volumes, allow_head=False)
    app.router.add_delete("/v1/volumes/{name}", remove_volume)
