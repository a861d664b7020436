"""`logs?follow=true` in-process on a real store and real local jobs: output that appears after
the request arrives is streamed, a client that goes away ends its stream on the server (the
follower gauge goes back to 0 while the job still runs), and followers per token are capped."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from orchestrator import auth
from orchestrator.api.app import ApiContext, make_app
from orchestrator.config import load_settings
from orchestrator.daemon import build_adapters
from orchestrator.engine import Engine
from orchestrator.store import Store
from tests.conftest import stop_every_machine
from tests.test_api import TOKEN, DaemonServer, H, finish, job_of, until

Api = tuple[TestClient, Engine, Path]


def waiting_job(trigger: Path) -> dict[str, Any]:
    """Prints 'before', then 'after' once `trigger` exists, then lives until cancelled."""
    code = (
        "import os, time\n"
        "print('before', flush=True)\n"
        f"while not os.path.exists({str(trigger)!r}): time.sleep(0.05)\n"
        "print('after', flush=True)\n"
        "time.sleep(600)\n"
    )
    return {"name": "follow", "command": [sys.executable, "-c", code], "resources": {"gpu_count": 0}}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    settings = load_settings(None, {"server": {"state_dir": str(tmp_path)}})
    store = Store(settings.database_url())
    store.migrate()
    key = auth.agent_key(tmp_path)
    engine = Engine(settings, store, build_adapters(settings, tmp_path / "logs"),
                    lambda n: auth.attempt_token(key, n))
    if hasattr(engine, "start_providers"):
        engine.start_providers()
    app = make_app(ApiContext(store=store, engine=engine, token=TOKEN, agent_key=key, logs_dir=tmp_path / "logs",
                              max_followers_per_token=2))
    client = TestClient(DaemonServer(app))
    await client.start_server()
    yield client, engine, tmp_path
    await stop_every_machine(engine.adapters)
    await client.close()
    store.close()


async def followers(client: TestClient) -> float:
    text = await (await client.get("/metrics", headers=H)).text()
    m = re.search(r"^gpuhop_log_followers (\S+)$", text, re.MULTILINE)
    assert m, "the follower gauge is exported"
    return float(m.group(1))


async def running_job(client: TestClient, engine: Engine, spec: dict[str, Any]) -> str:
    job = await (await client.post("/v1/jobs", json=spec, headers=H)).json()

    async def printed() -> bool:
        shown = await job_of(client, job["id"])
        if shown["status"] != "running":
            return False
        return b"before" in await (await client.get(f"/v1/jobs/{job['id']}/logs", headers=H)).read()

    await until(printed, engine, what="the job running and printing")
    return str(job["id"])


async def test_output_after_the_request_is_streamed(api: Api) -> None:
    client, engine, tmp = api
    trigger = tmp / "go"
    job_id = await running_job(client, engine, waiting_job(trigger))
    resp = await client.get(f"/v1/jobs/{job_id}/logs?follow=true", headers=H)
    assert resp.status == 200
    assert b"before" in await asyncio.wait_for(resp.content.readuntil(b"before\n"), 60)
    assert await followers(client) == 1
    trigger.touch()  # only now does the job print more
    assert await asyncio.wait_for(resp.content.readuntil(b"after\n"), 60) == b"after\n"
    await client.post(f"/v1/jobs/{job_id}/cancel", headers=H)

    async def stream_ended() -> bool:
        try:
            chunk = await asyncio.wait_for(resp.content.readany(), 0.5)  # a poll, not a bound
        except TimeoutError:
            return False
        return chunk == b""

    await until(stream_ended, engine, what="the stream to end with the job")
    resp.close()
    await finish(client, engine, job_id)


async def test_a_client_that_leaves_ends_its_stream(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    client, engine, tmp = api
    job_id = await running_job(client, engine, waiting_job(tmp / "never"))
    resp = await client.get(f"/v1/jobs/{job_id}/logs?follow=true", headers=H)
    assert await asyncio.wait_for(resp.content.readuntil(b"before\n"), 60) == b"before\n"
    assert await followers(client) == 1
    resp.close()  # Ctrl-C: the connection drops while the job runs on, printing nothing

    async def none_left() -> bool:
        return await followers(client) == 0

    await until(none_left, what="the server to end the abandoned stream")
    assert (await job_of(client, job_id))["status"] == "running"
    metrics = await (await client.get("/metrics", headers=H)).text()
    assert not re.search(r'gpuhop_api_requests_total\{[^}]*route="/v1/jobs/\{job_id\}/logs"[^}]*status="5', metrics)
    assert re.search(r'gpuhop_api_requests_total\{[^}]*route="/v1/jobs/\{job_id\}/logs"', metrics)
    assert not [r for r in caplog.records if r.name.startswith(("gpuhop.api", "aiohttp")) and r.levelname == "ERROR"]
    await finish(client, engine, job_id)


async def test_followers_per_token_are_capped(api: Api) -> None:
    client, engine, tmp = api
    job_id = await running_job(client, engine, waiting_job(tmp / "never"))
    url = f"/v1/jobs/{job_id}/logs?follow=true"
    first = await client.get(url, headers=H)
    second = await client.get(url, headers=H)
    assert (first.status, second.status) == (200, 200)
    third = await client.get(url, headers=H)
    assert third.status == 429
    assert "at most 2" in (await third.json())["error"]["message"]
    first.close()

    async def room() -> bool:
        return await followers(client) == 1

    await until(room, what="the closed stream to leave")
    fourth = await client.get(url, headers=H)
    assert fourth.status == 200
    second.close()
    fourth.close()
    await finish(client, engine, job_id)
