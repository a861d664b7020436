"""Endpoints through which a job's agent syncs its volume with object storage, without ever
holding a storage credential: the daemon answers with presigned URLs that expire
(`[storage] presign_ttl_seconds`).

* `POST /v1/agent/sync/restore` {"local_seq": n|null}: the newest complete checkpoint to restore
  before the job starts (files with GET URLs), or `restore: false` when the volume holds it already.
* `POST /v1/agent/sync/upload` {"blobs": [{sha256, size}]}: PUT URLs for the blobs not stored yet.
* `POST /v1/agent/sync/commit` {"files": [...]}: the daemon checks every blob is stored with its
  size (HEAD), then writes the next manifest; a checkpoint whose blobs are not all there is refused
  (409) and never becomes restorable.

Authenticated like the reports (`agent_routes`): the attempt's name in `X-Gpuhop-Attempt` and its
own token. An attempt that has ended may still commit (its final sync after a reclaim notice
races the daemon seeing the machine go), unless a later attempt of its job committed already.

Each commit records the checkpoint's total size on the volume's row (`Store.set_checkpoint_size`):
a move away from the volume's place restores that much, so it is priced at it (orchestrator/
moving.py), not at the volume's provisioned size.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator import auth
from orchestrator import checkpoints as cp
from orchestrator.api.agent_routes import _ATTEMPT_RE, _TOKEN_RE, ATTEMPT_HEADER, _bad_token
from orchestrator.api.app import CTX, ApiContext, bearer, error
from orchestrator.api.body import parse_json, read_body, validation_message
from orchestrator.models import AttemptStatus, JobSpec
from orchestrator.objectstore import ObjectStore, StorageError
from orchestrator.store.tables import AttemptRow

SYNC_MAX_BODY = 32 * 1024 * 1024  # a manifest of 100,000 files
PATHS = ("/v1/agent/sync/restore", "/v1/agent/sync/upload", "/v1/agent/sync/commit")
MAX_UPLOAD_BATCH = 1000
StrictInt = Annotated[int, Field(strict=True)]
GIB = 1024**3
log = logging.getLogger("gpuhop.api")


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    local_seq: StrictInt | None = Field(default=None, ge=0)


class BlobRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=5 * 1024**4)


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    blobs: list[BlobRef] = Field(max_length=MAX_UPLOAD_BATCH)


class CommitRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    files: list[cp.FileEntry] = Field(max_length=cp.MAX_FILES)


class _Caller:
    def __init__(self, ctx: ApiContext, row: AttemptRow, volume: str, objects: ObjectStore,
                 body: dict[str, Any]) -> None:
        self.ctx, self.row, self.volume, self.objects, self.body = ctx, row, volume, objects, body


async def _caller(request: web.Request) -> _Caller | web.Response:
    """The attempt speaking, its synced volume and its request body; or the refusal to send."""
    ctx = request.app[CTX]
    token, named = bearer(request), request.headers.get(ATTEMPT_HEADER, "")
    if (token is None or not _TOKEN_RE.fullmatch(token) or not named.isascii() or not _ATTEMPT_RE.fullmatch(named)
            or not auth.check_attempt_token(ctx.agent_key, named, token)):
        return _bad_token()
    body = parse_json(await read_body(request, SYNC_MAX_BODY))
    if not isinstance(body, dict):
        return error(400, "invalid_request", "the request must be a JSON object")
    row = await ctx.store.run(ctx.store.attempt_by_name, named)
    job = await ctx.store.run(ctx.store.get_job, row.job_id) if row is not None else None
    if row is None or job is None:
        return error(404, "not_found", "no such attempt")
    spec = JobSpec.model_validate_json(job.spec_json)
    if spec.volume is None or spec.volume.sync != "object-store":
        return error(409, "not_synced", "this job's volume is not synced through object storage")
    if ctx.objects is None:
        return error(503, "no_object_store", "this daemon has no [storage] configured",
                     headers={"Retry-After": "60"})
    return _Caller(ctx, row, spec.volume.name, ctx.objects, body)


def _unavailable(exc: StorageError) -> web.Response:
    return error(503, "storage_unavailable", str(exc), headers={"Retry-After": "5"})


async def restore(request: web.Request) -> web.Response:
    c = await _caller(request)
    if isinstance(c, web.Response):
        return c
    if c.row.status == AttemptStatus.ENDED.value:
        return error(410, "gone", f"attempt {c.row.name} has ended")
    try:
        req = RestoreRequest.model_validate(c.body)
        latest = await c.objects.latest_complete(c.volume)
    except ValidationError as exc:
        return error(422, "invalid_request", validation_message(exc))
    except StorageError as exc:
        return _unavailable(exc)
    seq = latest.seq if latest else None
    if latest is None or not cp.restore_plan(seq, req.local_seq):
        return web.json_response({"seq": seq, "restore": False, "files": []})
    files = [{**f.model_dump(), "url": c.objects.get_url(c.volume, f.sha256)} for f in latest.files]
    return web.json_response({"seq": seq, "restore": True, "files": files})


async def upload(request: web.Request) -> web.Response:
    c = await _caller(request)
    if isinstance(c, web.Response):
        return c
    try:
        req = UploadRequest.model_validate(c.body)
        wanted = {b.sha256: b.size for b in req.blobs}
        stored = await c.objects.blob_sizes(c.volume, sorted(wanted))
    except ValidationError as exc:
        return error(422, "invalid_request", validation_message(exc))
    except StorageError as exc:
        return _unavailable(exc)
    urls = [{"sha256": sha, "url": c.objects.put_url(c.volume, sha)}
            for sha, size in sorted(wanted.items()) if stored.get(sha) != size]
    return web.json_response({"upload": urls})


async def commit(request: web.Request) -> web.Response:
    c = await _caller(request)
    if isinstance(c, web.Response):
        return c
    try:
        req = CommitRequest.model_validate(c.body)
        files = cp.check_files(req.files)
    except ValidationError as exc:
        return error(422, "invalid_request", validation_message(exc))
    except ValueError as exc:
        return error(422, "invalid_request", f"files: {exc}")
    needed = {f.sha256: f.size for f in files}
    try:
        missing = cp.problems(needed, await c.objects.blob_sizes(c.volume, sorted(needed)))
        if missing:
            return error(409, "incomplete", "checkpoint not committed: " + "; ".join(missing[:5]),
                         problems=missing[:100])
        for _ in range(5):  # another commit may take the same seq first (If-None-Match): next one
            seqs = await c.objects.manifest_seqs(c.volume)
            latest = await c.objects.manifest(c.volume, seqs[0]) if seqs else None
            refusal = cp.commit_refusal(latest, c.row.job_id, c.row.number)
            if refusal is not None:
                return error(409, "superseded", refusal)
            m = cp.Manifest(volume=c.volume, seq=(seqs[0] if seqs else 0) + 1, job_id=c.row.job_id,
                            attempt=c.row.number, created_at=time.time(), files=files)
            if await c.objects.write_manifest(m):
                await _record_size(c, sum(f.size for f in files))
                return web.json_response({"seq": m.seq, "files": len(files)})
    except StorageError as exc:
        return _unavailable(exc)
    return error(503, "busy", "other commits kept taking the next seq; try again", headers={"Retry-After": "1"})


async def _record_size(c: _Caller, size: int) -> None:
    """The committed checkpoint's size, on its volume's row, for pricing a move. The manifest is
    written already: a failure here is logged, never answered as a failed commit (the agent would
    commit the same files again under a new seq)."""
    try:
        await c.ctx.store.run(c.ctx.store.set_checkpoint_size, c.volume, size / GIB)
    except Exception as exc:  # the next commit records it
        log.warning("could not record the size of volume %s's checkpoint: %s", c.volume, exc)


def setup(app: web.Application) -> None:
    app.router.add_post(PATHS[0], restore)
    app.router.add_post(PATHS[1], upload)
    app.router.add_post(PATHS[2], commit)
