"""Volumes as objects of their own (issue 11.4), through the REST API and the `gpuhop` CLI on a
real store (SQLite and PostgreSQL) and real providers: the local one, and RunPod's adapter against
its in-process simulator (storage that costs money, a provider that refuses or fails).

`volume rm` is refused while a job that has not ended uses the volume and deletes it (at the
provider, then the row) after; a deletion racing submits never leaves a live job on a deleted
volume; a provider failure keeps the volume; `[volumes] delete_after_days` deletes volumes left
unused that long and keeps the rest; resubmitting on a volume whose last job succeeded needs
--reuse-volume; `show` tells what the job's volume costs per month."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import update
from sqlmodel import Session, col

from adapters.base import VolumeSupport
from orchestrator import auth
from orchestrator.api.app import ApiContext, make_app
from orchestrator.config import ConfigError, load_settings
from orchestrator.daemon import build_adapters
from orchestrator.engine import Engine
from orchestrator.models import JobSpec, LaunchRequest
from orchestrator.store import JobRow, Store
from orchestrator.volume_deletion import retention_loop, sweep
from simulators.runpod import RunPodSimulator
from tests.runpod_fixtures import admin, running_sim
from tests.test_api import QUIET, SPEC, TOKEN, DaemonServer, H, check_schema, finish, job_of, until

REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0
DELETE = "/v1/volumes/{name}"

Api = tuple[TestClient, Engine]


async def make_api(tmp_path: Path, db_url: str, providers: dict[str, Any] | None = None) -> Api:
    overrides: dict[str, Any] = {"server": {"state_dir": str(tmp_path / "state")}}
    if providers is not None:
        overrides["providers"] = providers
    settings = load_settings(None, overrides)
    store = Store(db_url)
    store.migrate()
    key = auth.agent_key(settings.state_dir)
    adapters = build_adapters(settings, settings.state_dir / "logs")
    engine = Engine(settings, store, adapters, lambda n: auth.attempt_token(key, n))
    engine.start_providers()
    app = make_app(ApiContext(store=store, engine=engine, token=TOKEN, agent_key=key,
                              logs_dir=settings.state_dir / "logs"))
    client = TestClient(DaemonServer(app))
    await client.start_server()
    return client, engine


@pytest.fixture
async def api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    client, engine = await make_api(tmp_path, db_url)
    yield client, engine
    await client.close()
    engine.store.close()


async def doc_of(client: TestClient) -> dict[str, Any]:
    return dict(await (await client.get("/v1/openapi.json", headers=H)).json())


async def cli(client: TestClient, *args: str) -> tuple[int, str, str]:
    """`gpuhop ARGS` in its own process against the test server (the CLI is synchronous)."""
    env = {**os.environ, "GPUHOP_TOKEN": TOKEN, "GPUHOP_SERVER": str(client.make_url("")).rstrip("/")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode or 0, out.decode(), err.decode()


def volume_spec(base: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    return {**base, "name": name, "volume": {"name": name, "size_gb": 1, **extra}}


def ended_job(store: Store, job_id: str, spec: dict[str, Any], status: str, at: float | None = None,
              ended_at: float | None = None) -> JobRow:
    """A job recorded as if it had run (`at`) and ended with `status` (at `ended_at`)."""
    job = store.create_job(job_id, JobSpec.model_validate(spec), at)
    store.apply(job_id, {"status": status, "finished_at": ended_at or time.time()}, {}, [])
    if ended_at is not None:  # the store stamps updated_at with the clock: set it as of then
        with Session(store.engine) as s:
            s.execute(update(JobRow).where(col(JobRow.id) == job_id).values(updated_at=ended_at))
            s.commit()
    return job


async def placed(engine: Engine, provider: str, name: str, region: str, size_gb: int = 1) -> str:
    """Create the volume at the provider and record it where a launch would have."""
    adapter = engine.adapters[provider]
    assert isinstance(adapter, VolumeSupport)
    vol = await adapter.ensure_volume(name, size_gb, region)
    await engine.store.run(engine.store.set_volume_location, name, provider, region, vol.volume_id)
    return vol.volume_id


async def test_rm_is_refused_while_a_job_uses_the_volume_and_deletes_it_after(api: Api) -> None:
    client, engine = api
    doc = await doc_of(client)
    resp = await client.post("/v1/jobs", json=volume_spec(QUIET, "rm-vol"), headers=H)
    assert resp.status == 201
    job_id = (await resp.json())["id"]

    async def running() -> bool:
        return (await job_of(client, job_id))["status"] == "running"

    await until(running, engine, what="the job running")
    local = engine.adapters["local"]
    folder = local.volume_dir("rm-vol")  # type: ignore[attr-defined]
    assert folder.is_dir()
    resp = await client.delete("/v1/volumes/rm-vol", headers=H)
    assert resp.status == 409
    body = await resp.json()
    check_schema(doc, DELETE, "delete", 409, body)
    assert body["error"]["code"] == "volume_in_use" and job_id in body["error"]["message"]
    code, _, err = await cli(client, "volume", "rm", "rm-vol")
    assert code == 2 and f"in use by job {job_id}" in err, err
    assert folder.is_dir() and [v["name"] for v in (await (await client.get("/v1/volumes", headers=H)).json())[
        "volumes"]] == ["rm-vol"]

    await finish(client, engine, job_id)  # cancelled, its machine gone
    code, out, err = await cli(client, "volume", "rm", "rm-vol")
    assert code == 0, err
    assert "deleted volume 'rm-vol' (local local (rm-vol))" in out
    assert not folder.exists()
    assert (await (await client.get("/v1/volumes", headers=H)).json())["volumes"] == []
    resp = await client.delete("/v1/volumes/rm-vol", headers=H)
    assert resp.status == 404
    check_schema(doc, DELETE, "delete", 404, await resp.json())
    shown = await job_of(client, job_id)
    assert shown["volume"] is None
    assert [e["message"] for e in shown["events"] if e["kind"] == "volume_deleted"] == [
        "volume 'rm-vol' deleted: deleted on request (DELETE /v1/volumes) (was local local (rm-vol))"]
    code, out, _ = await cli(client, "show", job_id)
    assert code == 0 and "rm-vol: deleted" in out
    for bad in ("..", "a%0Ab", "-x", "x" * 64):
        assert (await client.delete(f"/v1/volumes/{bad}", headers=H)).status == 404, bad
    assert (await client.delete("/v1/volumes/x")).status == 401


async def test_a_volume_no_provider_holds_just_loses_its_row(api: Api) -> None:
    client, engine = api
    ended_job(engine.store, "a0000001", volume_spec(SPEC, "paper"), "cancelled")  # cancelled before any launch
    resp = await client.delete("/v1/volumes/paper", headers=H)
    assert resp.status == 200
    body = await resp.json()
    check_schema(await doc_of(client), DELETE, "delete", 200, body)
    assert (body["provider"], body["volume_id"]) == (None, None)
    assert body["message"] == "forgot volume 'paper': no job had created it on a provider yet"
    assert engine.store.volume("paper") is None


async def test_a_volume_whose_provider_is_not_configured_here_is_kept(api: Api) -> None:
    client, engine = api
    ended_job(engine.store, "a0000002", volume_spec(SPEC, "far"), "failed")
    engine.store.set_volume_location("far", "runpod", "EU-RO-1", "vol-far")
    resp = await client.delete("/v1/volumes/far", headers=H)
    assert resp.status == 502
    body = await resp.json()
    check_schema(await doc_of(client), DELETE, "delete", 502, body)
    assert body["error"]["code"] == "provider_failed"
    assert "lives on runpod, which is not configured here" in body["error"]["message"]
    kept = engine.store.volume("far")
    assert kept is not None and kept.provider_volume_id == "vol-far" and kept.deleting_token is None
    resp = await client.post("/v1/jobs?force=true", json=volume_spec(SPEC, "far"), headers=H)
    assert resp.status == 201  # the refused deletion left nothing behind: the volume is usable
    engine.store.update_job((await resp.json())["id"], status="cancelled")  # never ticked: nothing ran


async def test_rm_racing_submits_never_leaves_a_live_job_on_a_deleted_volume(api: Api) -> None:
    """DELETE and several submits naming the volume at once, over the API (the provider's call
    sits between the claim and the row's removal): either a submit won and the deletion was
    refused, or the deletion won and a job submitted after it got a new, empty volume."""
    client, engine = api
    local = engine.adapters["local"]
    seen: set[str] = set()
    for n in range(6):
        name = f"race-{n}"
        ended_job(engine.store, f"b000000{n}", volume_spec(SPEC, name), "failed")
        await placed(engine, "local", name, "local")
        before = engine.store.volume(name)
        assert before is not None
        calls = [client.delete(f"/v1/volumes/{name}", headers=H)]
        calls += [client.post("/v1/jobs", json=volume_spec(QUIET, name), headers=H) for _ in range(5)]
        answers = await asyncio.gather(*calls)
        deleted, submits = answers[0].status, [r.status for r in answers[1:]]
        assert deleted in (200, 409) and set(submits) <= {201, 409}, (deleted, submits)
        jobs = [(await r.json())["id"] for r in answers[1:] if r.status == 201]
        assert len(jobs) <= 1, jobs
        now = engine.store.volume(name)
        if deleted == 200:
            seen.add("deleted")
            assert not local.volume_dir(name).exists()  # type: ignore[attr-defined]
            if jobs:  # submitted after the row went: a new volume no provider holds yet
                seen.add("deleted, then a new volume")
                assert now is not None and now.created_at > before.created_at and now.provider is None
        else:
            seen.add("in use")
            assert len(jobs) == 1 and now is not None and now.created_at == before.created_at
            assert local.volume_dir(name).is_dir()  # type: ignore[attr-defined]
        for job_id in jobs:  # never ticked: nothing runs; end them so the name is free
            engine.store.update_job(job_id, status="cancelled")
    assert seen & {"deleted", "in use"}, seen


async def test_resubmitting_on_the_volume_of_a_job_that_succeeded_needs_reuse(api: Api, tmp_path: Path) -> None:
    client, engine = api
    spec = volume_spec(SPEC, "again")
    resp = await client.post("/v1/jobs", json=spec, headers=H)
    first = (await resp.json())["id"]

    async def succeeded(job_id: str = first) -> bool:
        return (await job_of(client, job_id))["status"] == "succeeded"

    await until(succeeded, engine, what="the first job finished")
    resp = await client.post("/v1/jobs", json=spec, headers=H)
    assert resp.status == 409
    body = await resp.json()
    check_schema(await doc_of(client), "/v1/jobs", "post", 409, body)
    assert body["error"]["code"] == "volume_finished"
    message = body["error"]["message"]
    assert f"final state of job {first}" in message and "--reuse-volume" in message
    assert "?reuse_volume=true" in message and "gpuhop volume rm again" in message
    assert (await client.post("/v1/jobs?reuse_volume=maybe", json=spec, headers=H)).status == 400
    spec_file = tmp_path / "again.json"
    spec_file.write_text(json.dumps(spec))
    code, _, err = await cli(client, "submit", str(spec_file))
    assert code == 2 and "--reuse-volume" in err, err
    code, out, err = await cli(client, "submit", "--reuse-volume", str(spec_file))
    assert code == 0, err
    second = out.strip()
    await until(lambda: succeeded(second), engine, what="the second job finished")
    resp = await client.post("/v1/jobs?reuse_volume=true", json=spec, headers=H)
    assert resp.status == 201
    third = (await resp.json())["id"]
    await until(lambda: succeeded(third), engine, what="the third job finished")


async def test_retention_deletes_volumes_left_unused_and_keeps_the_rest(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    _, engine = api
    store, adapters = engine.store, engine.adapters
    local = adapters["local"]
    now = time.time()
    ended_job(store, "c0000001", volume_spec(SPEC, "old"), "succeeded", now - 12 * DAY, now - 10 * DAY)
    ended_job(store, "c0000002", volume_spec(SPEC, "recent"), "failed", now - 12 * DAY, now - 2 * DAY)
    store.create_job("c0000003", JobSpec.model_validate(volume_spec(SPEC, "busy")), now - 30 * DAY)  # queued
    for name in ("old", "recent", "busy"):
        await placed(engine, "local", name, "local")
    assert await sweep(store, adapters, 0) == []  # 0: never
    caplog.set_level(logging.INFO, logger="gpuhop.volumes")
    assert await sweep(store, adapters, 7) == ["old"]
    assert not local.volume_dir("old").exists()  # type: ignore[attr-defined]
    assert all(local.volume_dir(n).is_dir() for n in ("recent", "busy"))  # type: ignore[attr-defined]
    assert [v.name for v in store.list_volumes()] == ["busy", "recent"]
    [event] = [e for e in store.events("c0000001") if e.kind == "volume_deleted"]
    assert event.message == ("volume 'old' deleted: no job used it for 7 days ([volumes] delete_after_days) "
                             "(was local local (old))")
    assert "deleted volume old (local local (old), 1 GB): no job used it for 7 days" in caplog.text

    # the daemon's loop runs the same sweep
    ended_job(store, "c0000004", volume_spec(SPEC, "older"), "failed", now - 40 * DAY, now - 40 * DAY)
    await placed(engine, "local", "older", "local")
    stop = asyncio.Event()
    loop = asyncio.create_task(retention_loop(store, adapters, 7, stop, ready=engine.observer.started,
                                              every=0.05, first_after=0))

    async def gone() -> bool:
        return await store.run(store.volume, "older") is None

    await until(gone, what="the retention loop deleting 'older'")
    stop.set()
    await asyncio.wait_for(loop, 60)
    assert [v.name for v in store.list_volumes()] == ["busy", "recent"]


def test_delete_after_days_is_checked_at_start(tmp_path: Path) -> None:
    assert load_settings(None).volumes.delete_after_days == 0
    assert load_settings(REPO / "config.example.toml").volumes.delete_after_days == 0
    for bad, says in (("-1", "greater than or equal to 0"), ('"never"', "valid number"), ("1e9", "less than")):
        path = tmp_path / "c.toml"
        path.write_text(f"[volumes]\ndelete_after_days = {bad}\n")
        with pytest.raises(ConfigError, match=f"volumes.delete_after_days: .*{says}"):
            load_settings(path)
    path = tmp_path / "ok.toml"
    path.write_text("[volumes]\ndelete_after_days = 30\n")
    assert load_settings(path).volumes.delete_after_days == 30


# ----------------------------------------------------------------------------- RunPod (simulated)


RunPodApi = tuple[TestClient, Engine, RunPodSimulator]


@pytest.fixture
async def runpod_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunPodApi]:
    async with running_sim(tmp_path, monkeypatch) as sim:
        table = {"api_key": sim.api_key, "api_url": sim.url, "request_timeout_seconds": 2.0, "retry_attempts": 3,
                 "retry_base_delay_seconds": 0.05, "retry_budget_seconds": 5.0}
        client, engine = await make_api(tmp_path, f"sqlite:///{tmp_path / 'gpuhop.db'}", {"runpod": table})
        try:
            async def started() -> bool:
                return engine.observer.started("runpod")

            await until(started, what="the RunPod adapter started")
            yield client, engine, sim
        finally:
            await client.close()
            engine.store.close()


async def used_runpod_volume(engine: Engine, job_id: str, name: str) -> str:
    """A 10 GB RunPod volume in US-TX-3 that a succeeded GPU job used; its provider id."""
    spec = volume_spec({**SPEC, "resources": {"gpu": ["RTX-4090"], "gpu_count": 1}}, name)
    spec["volume"]["size_gb"] = 10
    ended_job(engine.store, job_id, spec, "succeeded")
    return await placed(engine, "runpod", name, "US-TX-3", size_gb=10)


async def test_a_runpod_volume_costs_storage_and_a_failing_provider_keeps_it(runpod_api: RunPodApi) -> None:
    client, engine, sim = runpod_api
    doc = await doc_of(client)
    volume_id = await used_runpod_volume(engine, "d1e2f3a4", "rp-vol")

    # what it costs, where the job is shown
    shown = await job_of(client, "d1e2f3a4")
    check_schema(doc, "/v1/jobs/{job_id}", "get", 200, shown)
    assert shown["volume"]["storage_usd_per_month"] == pytest.approx(0.7)  # 10 GB at $0.07
    code, out, err = await cli(client, "show", "d1e2f3a4")
    assert code == 0, err
    assert f"rp-vol 10 GB at /workspace: runpod US-TX-3 ({volume_id}), storage $0.7000 per month" in out
    listed = await (await client.get("/v1/volumes", headers=H)).json()
    assert listed["storage_usd_per_month"] == pytest.approx(0.7)

    # a machine still holds it (its job ended, the machine is not gone yet): RunPod refuses
    adapter = engine.adapters["runpod"]
    offer = next(o for o in await adapter.offers() if o.region == "US-TX-3" and o.supports_volumes)
    name = "gpuhop-d1e2f3a4-1"
    inst = await adapter.launch(LaunchRequest(
        name=name, idempotency_key=name, job_id="d1e2f3a4", attempt=1, offer=offer, image="python:3.11-slim",
        command=[sys.executable, "-c", "import time; time.sleep(600)"],
        env={"GPUHOP_JOB_ID": "d1e2f3a4", "GPUHOP_ATTEMPT": "1", "GPUHOP_ATTEMPT_NAME": name}, disk_gb=20,
        volume=await adapter.ensure_volume("rp-vol", 10, "US-TX-3"),  # type: ignore[attr-defined]
        mount_path="/workspace"))
    try:
        resp = await client.delete("/v1/volumes/rp-vol", headers=H)
        assert resp.status == 502
        body = await resp.json()
        check_schema(doc, DELETE, "delete", 502, body)
        assert "attached to a pod" in body["error"]["message"] and "it is kept" in body["error"]["message"]
    finally:
        await adapter.terminate(inst.instance_id)

    # RunPod fails for a while: 503 with Retry-After, the volume kept everywhere
    await admin(sim, "POST", "/_sim/faults", {"kind": "500", "count": 50})
    resp = await client.delete("/v1/volumes/rp-vol", headers=H)
    await admin(sim, "DELETE", "/_sim/faults")
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    body = await resp.json()
    check_schema(doc, DELETE, "delete", 503, body)
    assert body["error"]["code"] == "provider_unavailable"
    assert [v["id"] for v in (await admin(sim, "GET", "/_sim/pods"))["volumes"]] == [volume_id]
    assert engine.store.volume("rp-vol").deleting_token is None  # type: ignore[union-attr]

    resp = await client.delete("/v1/volumes/rp-vol", headers=H)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    check_schema(doc, DELETE, "delete", 200, body)
    assert body["message"] == f"deleted volume 'rp-vol' (runpod US-TX-3 ({volume_id}))"
    assert (await admin(sim, "GET", "/_sim/pods"))["volumes"] == []
    assert (await job_of(client, "d1e2f3a4"))["volume"] is None

    # already gone at RunPod (deleted by hand in its console): success, the row goes
    ended_job(engine.store, "d1e2f3a5", volume_spec(SPEC, "rp-gone"), "failed")
    gone_id = await placed(engine, "runpod", "rp-gone", "US-TX-3")
    await adapter.delete_volume(gone_id)  # type: ignore[attr-defined]
    assert (await client.delete("/v1/volumes/rp-gone", headers=H)).status == 200
    assert engine.store.list_volumes() == []


async def test_moves_and_retired_volumes_are_listed_and_counted_as_storage(runpod_api: RunPodApi) -> None:
    """Storage bills whether or not a volume row uses it: a move's new volume while the move is
    under way and the volumes a move left behind (being deleted) are listed with their price,
    and the total per month counts them, so no billing volume is out of sight."""
    client, engine, _ = runpod_api
    doc = await doc_of(client)
    old_id = await used_runpod_volume(engine, "a1b2c3d4", "mover")
    store = engine.store
    store.set_checkpoint_size("mover", 2.5)
    assert store.begin_volume_move("mover", old_id, "runpod", "EU-RO-1", "gpuhop-a1b2c3d4-2") is None
    assert store.set_move_volume("mover", "gpuhop-a1b2c3d4-2", "vol-new")
    listed = await (await client.get("/v1/volumes", headers=H)).json()
    check_schema(doc, "/v1/volumes", "get", 200, listed)
    (vol,) = listed["volumes"]
    assert vol["moving_to"] == "runpod EU-RO-1 (vol-new)" and vol["checkpoint_gb"] == 2.5
    assert listed["retired"] == []
    assert listed["storage_usd_per_month"] == pytest.approx(1.4)  # the old and the new, 10 GB at $0.07 each

    assert store.commit_volume_move("mover", "gpuhop-a1b2c3d4-2", "vol-new", "left behind by the move")
    listed = await (await client.get("/v1/volumes", headers=H)).json()
    check_schema(doc, "/v1/volumes", "get", 200, listed)
    (vol,) = listed["volumes"]
    assert vol["moving_to"] is None and vol["volume_id"] == "vol-new" and vol["region"] == "EU-RO-1"
    (gone,) = listed["retired"]
    assert (gone["volume_name"], gone["region"], gone["volume_id"]) == ("mover", "US-TX-3", old_id)
    assert gone["reason"] == "left behind by the move" and gone["storage_usd_per_month"] == pytest.approx(0.7)
    assert listed["storage_usd_per_month"] == pytest.approx(1.4)  # still billing until deleted
    code, out, err = await cli(client, "volumes")
    assert code == 0, err
    assert "mover (retired)" in out and old_id in out and "checkpoint 2.5 GB" in out
