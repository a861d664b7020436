"""The endpoint job agents on remote machines report to: start, heartbeats with new log output,
a reclaim notice seen from inside the machine, and the job's exit code.

Each report carries the attempt's own token (HMAC of its name), so a machine can only speak for
its own attempt. Reports only record facts; the engine decides what they mean.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator import auth
from orchestrator.api.app import CTX, error
from orchestrator.api.routes import read_json, validation_message
from orchestrator.models import AttemptStatus


class AgentReport(BaseModel):
    model_config = ConfigDict(extra="ignore")  # newer agents may send more

    attempt: str = Field(max_length=96)
    event: Literal["start", "heartbeat", "exit", "interruption"]
    exit_code: int | None = Field(default=None, ge=0, le=255)
    signal: int | None = Field(default=None, ge=1, le=128)
    stopped_by_us: bool = False
    sigterm_received: bool = False
    log_offset: int | None = Field(default=None, ge=0)
    log: str | None = Field(default=None, max_length=512 * 1024)


def append_log(path: Path, offset: int, text: str) -> None:
    """Write a chunk at its offset: a chunk sent twice (a retried report) is written once."""
    data = text.encode("utf-8", "replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size if path.exists() else 0
    if offset + len(data) <= size:
        return
    with open(path, "ab") as fh:
        fh.write(data[max(0, size - offset):])


async def report(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await read_json(request)
    try:
        rep = AgentReport.model_validate(body)
    except ValidationError as exc:
        return error(422, "invalid_report", validation_message(exc))
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not auth.check_attempt_token(ctx.agent_key, rep.attempt, token.strip()):
        return error(401, "unauthorized", "this token is not valid for that attempt")
    row = await ctx.store.run(ctx.store.attempt_by_name, rep.attempt)
    if row is None:
        return error(404, "not_found", "no such attempt")
    now = time.time()
    if rep.log and rep.log_offset is not None:
        await asyncio.to_thread(append_log, ctx.logs_dir / f"{row.name}.log", rep.log_offset, rep.log)
    if row.status == AttemptStatus.ENDED.value:
        return web.json_response({"ok": True, "attempt_status": row.status})
    fields: dict[str, object] = {"last_heartbeat_at": now}
    if rep.event == "start" and row.agent_state != "exited":
        fields["agent_state"] = "started"
    elif rep.event == "exit":
        fields.update(agent_state="exited", exit_code=rep.exit_code, exit_signal=rep.signal,
                      sigterm_received=rep.sigterm_received)
    await ctx.store.run(ctx.store.update_attempt, row.id or 0, **fields)
    if rep.event == "interruption":
        await ctx.engine.record_interruption(row.provider, row.instance_id or "", now + 120)
    if rep.event in ("exit", "interruption", "start"):
        ctx.engine.hint()
    return web.json_response({"ok": True, "attempt_status": row.status})


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/agent/report", report)
