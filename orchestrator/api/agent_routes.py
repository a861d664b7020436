"""The endpoint job agents on remote machines report to: start, heartbeats with new log output,
a reclaim notice seen from inside the machine, and the job's exit code.

Each report carries the attempt's own token (HMAC of its name), so a machine can only speak for
its own attempt, and the token is checked before the body is read: the attempt's name comes in
the `X-Gpuhop-Attempt` header. (An agent that sends the name only in the body is still
understood, but its token must at least look like one before its body is read.) An attempt that
has ended is told so (410) and can no longer write anything. Its log is append-only: a chunk must
start at the size the daemon holds (409 with that size otherwise), and a chunk sent again is
acknowledged without being written twice. Reports only record facts; the engine decides what
they mean.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError, field_validator

from orchestrator import auth
from orchestrator.api.app import CTX, bearer, error
from orchestrator.api.body import MAX_BODY, parse_json, read_body, validation_message
from orchestrator.api.views import AgentAck, respond
from orchestrator.models import AttemptStatus

ATTEMPT_HEADER = "X-Gpuhop-Attempt"
AGENT_MAX_BODY = 4 * MAX_BODY  # a 256 KiB log chunk of escaped bytes is up to 1.5 MiB of JSON
_ATTEMPT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TOKEN_RE = re.compile(r"[0-9a-f]{64}")  # what auth.attempt_token makes
MAX_LOG_TEXT = 512 * 1024

StrictInt = Annotated[int, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class AgentReport(BaseModel):
    model_config = ConfigDict(extra="ignore")  # newer agents may send more

    attempt: str = Field(max_length=96, json_schema_extra={"pattern": "^" + _ATTEMPT_RE.pattern + "$"})
    event: Literal["start", "heartbeat", "exit", "interruption"]
    exit_code: StrictInt | None = Field(default=None, ge=0, le=255)
    signal: StrictInt | None = Field(default=None, ge=1, le=128)
    stopped_by_us: StrictBool = False
    sigterm_received: StrictBool = False
    log_offset: StrictInt | None = Field(default=None, ge=0, le=2**53)
    log: Annotated[str | None, SkipValidation] = Field(  # pydantic refuses surrogates: checked below
        default=None, max_length=MAX_LOG_TEXT,
        description="new output from log_offset on: UTF-8 text; bytes that are not UTF-8 are sent "
                    "as the surrogates Python's 'surrogateescape' makes (U+DC80-U+DCFF)",
    )

    @field_validator("attempt")
    @classmethod
    def _attempt(cls, value: str) -> str:
        if not _ATTEMPT_RE.fullmatch(value):
            raise ValueError("not an attempt name")
        return value

    @field_validator("log", mode="before")
    @classmethod
    def _log(cls, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if len(value) > MAX_LOG_TEXT:
            raise ValueError(f"must be at most {MAX_LOG_TEXT} characters (send the rest in the next report)")
        try:
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ValueError("holds a lone surrogate that is not an escaped byte (U+DC80-U+DCFF)") from None
        return value

    def log_bytes(self) -> bytes:
        """The chunk as the bytes the job wrote (exactly, for an agent that escapes them)."""
        return (self.log or "").encode("utf-8", "surrogateescape")


class LogConflict(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def append_log(path: Path, offset: int, data: bytes) -> int:
    """Append a chunk that starts at `offset` to the attempt's log (mode 0600); the log's size
    after. Only bytes past the current size are ever written: a chunk resent after its answer was
    lost (all of it, or the start of it, already there and equal) is acknowledged, and its new
    tail alone is written. A chunk that would leave a gap or differs from what is there raises
    LogConflict with the size the next chunk must start at."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one report at a time per log, even across processes
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # a log written by an older daemon
        size = st.st_size
        if offset > size:
            raise LogConflict(size)
        overlap = min(len(data), size - offset)
        if overlap and os.pread(fd, overlap, offset) != data[:overlap]:
            raise LogConflict(size)
        rest = data[overlap:]
        while rest:
            written = os.write(fd, rest)
            rest = rest[written:]
        return size + len(data) - overlap
    finally:
        os.close(fd)  # releases the lock


def _bad_token() -> web.Response:
    return error(401, "unauthorized", "this token is not valid for that attempt")


async def _authenticated_report(request: web.Request) -> tuple[AgentReport, None] | tuple[None, web.Response]:
    """The report, once its token is known to be that attempt's; else the answer to send."""
    ctx = request.app[CTX]
    token = bearer(request)
    if token is None or not _TOKEN_RE.fullmatch(token):
        return None, _bad_token()
    named = request.headers.get(ATTEMPT_HEADER)
    body: Any
    if named is not None:
        if not (named.isascii() and _ATTEMPT_RE.fullmatch(named)
                and auth.check_attempt_token(ctx.agent_key, named, token)):
            return None, _bad_token()
        body = parse_json(await read_body(request, AGENT_MAX_BODY))
        if isinstance(body, dict) and body.get("attempt", named) != named:
            return None, _bad_token()  # the token speaks for the header's attempt, not the body's
        if isinstance(body, dict):
            body.setdefault("attempt", named)
    else:  # an agent that names its attempt only in the body
        body = parse_json(await read_body(request, MAX_BODY))
        name = body.get("attempt") if isinstance(body, dict) else None
        if not (isinstance(name, str) and name.isascii() and _ATTEMPT_RE.fullmatch(name)
                and auth.check_attempt_token(ctx.agent_key, name, token)):
            return None, _bad_token()
    if not isinstance(body, dict):
        return None, error(400, "invalid_report", "the report must be a JSON object")
    try:
        return AgentReport.model_validate(body), None
    except ValidationError as exc:
        return None, error(422, "invalid_report", validation_message(exc))


async def report(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    rep, refusal = await _authenticated_report(request)
    if refusal is not None:
        return refusal
    assert rep is not None
    row = await ctx.store.run(ctx.store.attempt_by_name, rep.attempt)
    if row is None:
        return error(404, "not_found", "no such attempt")
    if row.status == AttemptStatus.ENDED.value:
        return error(410, "gone", f"attempt {row.name} has ended ({row.end_reason or 'ended'}); "
                                  "it takes no more reports")
    now = time.time()
    log_size: int | None = None
    if rep.log and rep.log_offset is not None:
        try:
            log_size = await asyncio.to_thread(
                append_log, ctx.logs_dir / f"{row.name}.log", rep.log_offset, rep.log_bytes()
            )
        except LogConflict as exc:
            return error(409, "log_offset", f"this attempt's log holds {exc.size} bytes: send output "
                                            f"from offset {exc.size}", expected_offset=exc.size)
        ctx.followers.notify(row.job_id)
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
        ctx.followers.notify(row.job_id)
    urls = [f"{base}/v1/agent/report" for base in ctx.engine.report_bases()]
    return respond(AgentAck(ok=True, attempt_status=AttemptStatus(row.status), log_size=log_size,
                                           report_urls=urls))


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/agent/report", report)
