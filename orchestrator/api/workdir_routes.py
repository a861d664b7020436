"""Job working directories over HTTP: `PUT /v1/workdirs/{sha256}` takes a tar.gz from the CLI
(API token), and `GET /v1/agent/workdir` hands it to the agent of an attempt whose job names it
(that attempt's own token, as its reports carry), before the command runs on every attempt.

Content-addressed: the upload is refused unless its bytes hash to the sha256 in its URL, is at
most `[workdirs] max_mb`, and is an archive the agent could unpack safely (orchestrator.workdir);
a job naming a sha256 never uploaded is refused at submit (`refuse_unknown`). The archives live in
the database (store.workdirs), so any replica serves any job's agent. A module of its own so that
the report endpoint (agent_routes) stays about reports.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from orchestrator import auth, workdir
from orchestrator.api.agent_routes import _ATTEMPT_RE, _TOKEN_RE, ATTEMPT_HEADER, _bad_token
from orchestrator.api.app import CTX, ApiContext, bearer, error
from orchestrator.api.body import read_body
from orchestrator.models import AttemptStatus, JobSpec

AGENT_PATH = "/v1/agent/workdir"
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _limits(ctx: ApiContext) -> tuple[int, int]:
    s = ctx.engine.settings.workdirs
    return int(s.max_mb * workdir.MB), int(s.max_unpacked_mb * workdir.MB)


async def put_workdir(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    sha = request.match_info["sha256"]
    if not _SHA_RE.fullmatch(sha):
        return error(400, "invalid_sha256", "the path must end in the archive's sha256: 64 lowercase hex digits")
    max_bytes, max_unpacked = _limits(ctx)
    size = request.content_length
    if size is not None and size > max_bytes:
        return error(413, "workdir_too_large", workdir.too_big_message(size, max_bytes, None)
                     + " ([workdirs] max_mb); add big entries to .gpuhopignore")
    try:
        data = await read_body(request, max_bytes)
    except web.HTTPRequestEntityTooLarge:
        return error(413, "workdir_too_large", f"the workdir archive is over the limit of "
                     f"{workdir.human(max_bytes)} ([workdirs] max_mb); add big entries to .gpuhopignore")
    actual = workdir.sha256(data)
    if actual != sha:
        return error(422, "sha256_mismatch", f"the body's sha256 is {actual}, not {sha}: the upload was "
                                             "damaged or the URL names another archive; nothing was stored")
    try:
        unpacked = await asyncio.to_thread(workdir.inspect_archive, data, max_unpacked)
    except workdir.WorkdirError as exc:
        return error(422, "invalid_workdir", f"{exc}; nothing was stored")
    created = await ctx.store.run(ctx.store.put_workdir, sha, data, unpacked)
    return web.json_response({"sha256": sha, "size": len(data), "unpacked_size": unpacked, "created": created},
                             status=201 if created else 200)


async def refuse_unknown(ctx: ApiContext, spec: JobSpec) -> web.Response | None:
    """The submit's answer when the job names a working directory this daemon never received."""
    sha = spec.workdir_sha256
    if sha is None or await ctx.store.run(ctx.store.has_workdir, sha):
        return None
    return error(422, "unknown_workdir", f"workdir_sha256 {sha} was never uploaded: PUT the archive to "
                                         f"/v1/workdirs/{sha} first (`gpuhop submit` does it)")


async def agent_workdir(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    token, name = bearer(request), request.headers.get(ATTEMPT_HEADER, "")
    if token is None or not _TOKEN_RE.fullmatch(token) or not (
            name.isascii() and _ATTEMPT_RE.fullmatch(name) and auth.check_attempt_token(ctx.agent_key, name, token)):
        return _bad_token()
    row = await ctx.store.run(ctx.store.attempt_by_name, name)
    if row is None:
        return error(404, "not_found", "no such attempt")
    if row.status == AttemptStatus.ENDED.value:
        return error(410, "gone", f"attempt {row.name} has ended")
    job = await ctx.store.run(ctx.store.get_job, row.job_id)
    sha = JobSpec.model_validate_json(job.spec_json).workdir_sha256 if job is not None else None
    data = await ctx.store.run(ctx.store.workdir_data, sha) if sha else None
    if data is None:
        return error(404, "not_found", f"job {row.job_id} has no working directory")
    return web.Response(body=data, content_type="application/gzip", headers={"X-Gpuhop-Sha256": sha or ""})


def openapi_paths(error_ref: dict[str, Any]) -> dict[str, Any]:
    """This module's routes for the OpenAPI document (orchestrator.api.openapi)."""
    def errors(*codes: int) -> dict[str, Any]:
        return {str(c): {"description": "Refused (the message says why)",
                         "content": {"application/json": {"schema": error_ref}}} for c in codes}

    gz = {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}
    stored = {"type": "object", "required": ["sha256", "size", "unpacked_size", "created"], "properties": {
        "sha256": {"type": "string", "pattern": workdir.SHA256_PATTERN}, "size": {"type": "integer"},
        "unpacked_size": {"type": "integer"}, "created": {"type": "boolean"}}}
    stored_resp = {"content": {"application/json": {"schema": stored}}}
    return {
        "/v1/workdirs/{sha256}": {"put": {
            "summary": "Upload a job's working directory: a tar.gz whose sha256 is the path's (then submit a "
                       "job with workdir_sha256). Refused unless the hash matches, it is at most [workdirs] "
                       "max_mb, and it unpacks safely (no absolute or '..' paths, links inside, no devices)",
            "parameters": [{"name": "sha256", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": workdir.SHA256_PATTERN}}],
            "requestBody": {"required": True, "content": gz},
            "responses": {"201": {"description": "Stored", **stored_resp},
                          "200": {"description": "Already stored", **stored_resp},
                          **errors(400, 401, 413, 422)}}},
        AGENT_PATH: {"get": {
            "summary": "The working directory of the agent's job (tar.gz), fetched before every attempt; "
                       "per-attempt token",
            "security": [{"agent": []}],
            "parameters": [{"name": ATTEMPT_HEADER, "in": "header", "required": True,
                            "schema": {"type": "string", "pattern": "^" + _ATTEMPT_RE.pattern + "$"}}],
            "responses": {"200": {"description": "The archive", "content": gz}, **errors(401, 404, 410)}}},
    }


def setup(app: web.Application) -> None:
    app.router.add_put("/v1/workdirs/{sha256}", put_workdir)
    app.router.add_get(AGENT_PATH, agent_workdir, allow_head=False)
