"""How jobs, attempts and events look on the wire: one function each, used by the API (and so
by `gpuhop show --json`). Times are ISO 8601 UTC; costs are USD, live attempts priced so far."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from orchestrator import reconcile
from orchestrator.engine import attempt_view
from orchestrator.store import AttemptRow, EventRow, JobRow, VolumeRow


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def attempt_json(row: AttemptRow, now: float) -> dict[str, Any]:
    return {
        "number": row.number,
        "name": row.name,
        "provider": row.provider,
        "region": row.region,
        "offer_id": row.offer_id,
        "capacity": row.capacity,
        "gpu": row.gpu,
        "gpu_count": row.gpu_count,
        "price_per_hour": row.price_per_hour,
        "instance_id": row.instance_id,
        "volume_id": row.volume_id,
        "status": row.status,
        "end_reason": row.end_reason,
        "detail": row.detail,
        "exit_code": row.exit_code,
        "exit_signal": row.exit_signal,
        "cost_usd": round(reconcile.attempt_cost(attempt_view(row), now), 6),
        "placement_reason": row.placement_reason,
        "created_at": iso(row.created_at),
        "launched_at": iso(row.launched_at),
        "running_at": iso(row.running_at),
        "ended_at": iso(row.ended_at),
        "last_heartbeat_at": iso(row.last_heartbeat_at),
        "interruption_at": iso(row.interruption_at),
    }


def job_json(
    job: JobRow,
    attempts: list[AttemptRow],
    events: list[EventRow] | None = None,
    volume: VolumeRow | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    now = now or time.time()
    rows = [attempt_json(a, now) for a in attempts]
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "end_reason": job.end_reason,
        "message": job.message,
        "cost_usd": round(sum(a["cost_usd"] for a in rows), 6),
        "attempt_count": len(rows),
        "relaunches": job.relaunches,
        "retries": job.retries,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "finished_at": iso(job.finished_at),
        "cancel_requested": job.cancel_requested,
        "spec": json.loads(job.spec_json),
        "attempts": rows,
    }
    if volume is not None:
        out["volume"] = {
            "name": volume.name, "size_gb": volume.size_gb, "mount_path": volume.mount_path,
            "provider": volume.provider, "region": volume.region, "volume_id": volume.provider_volume_id,
        }
    if events is not None:
        out["events"] = [
            {"at": iso(e.at), "kind": e.kind, "attempt": e.attempt, "message": e.message} for e in events
        ]
    return out
