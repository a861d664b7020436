"""The REST API in-process (aiohttp test client) on a real store and the local provider: auth,
the OpenAPI document against the router, agent report tokens, and bad queries."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from orchestrator import auth
from orchestrator.api.app import ApiContext, make_app
from orchestrator.api.openapi import openapi_document
from orchestrator.config import load_settings
from orchestrator.daemon import build_adapters
from orchestrator.engine import Engine
from orchestrator.store import Store

TOKEN = "test-token-0123456789"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Engine, bytes]]:
    settings = load_settings(None, {"server": {"state_dir": str(tmp_path)}})
    store = Store(settings.database_url())
    store.migrate()
    key = auth.agent_key(tmp_path)
    adapters = build_adapters(settings, tmp_path / "logs")
    engine = Engine(settings, store, adapters, lambda n: auth.attempt_token(key, n))
    app = make_app(ApiContext(store=store, engine=engine, token=TOKEN, agent_key=key, logs_dir=tmp_path / "logs"))
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client, engine, key
    await client.close()
    store.close()


H = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"name": "api", "command": [sys.executable, "-c", "print(1)"], "resources": {"gpu_count": 0}}


async def test_everything_but_healthz_needs_the_token(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/offers"), ("GET", "/metrics"),
                         ("GET", "/v1/openapi.json"), ("GET", "/v1/jobs/abc"), ("POST", "/v1/jobs/abc/cancel")]:
        resp = await client.request(method, path)
        assert resp.status == 401, path
        assert "bearer token" in (await resp.json())["error"]["message"]
        resp = await client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
    assert (await client.get("/healthz")).status in (200, 503)


async def test_openapi_documents_exactly_the_routes(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    served = set()
    for route in client.app.router.routes():
        if route.method in ("GET", "POST"):
            served.add((route.method.lower(), route.resource.canonical))
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented
    doc = await (await client.get("/v1/openapi.json", headers=H)).json()
    assert doc["components"]["schemas"]["JobSpec"]["additionalProperties"] is False


async def test_submit_list_show_and_filters(api) -> None:  # type: ignore[no-untyped-def]
    client, engine, _ = api
    resp = await client.post("/v1/jobs", json=SPEC, headers=H)
    assert resp.status == 201
    job = await resp.json()
    assert job["status"] == "queued" and len(job["id"]) == 8
    listed = await (await client.get("/v1/jobs?status=queued", headers=H)).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert (await (await client.get("/v1/jobs?status=running", headers=H)).json())["jobs"] == []
    assert (await client.get("/v1/jobs?status=bogus", headers=H)).status == 400
    assert (await client.get("/v1/jobs?limit=x", headers=H)).status == 400
    assert (await client.get("/v1/jobs/../../etc", headers=H)).status == 404
    assert (await client.get("/v1/jobs/ffffffff", headers=H)).status == 404
    shown = await (await client.get(f"/v1/jobs/{job['id']}", headers=H)).json()
    assert shown["events"][0]["kind"] == "submitted"
    assert (await client.get(f"/v1/jobs/{job['id']}/logs?tail=-1", headers=H)).status == 400
    offers = await (await client.get("/v1/offers", headers=H)).json()
    assert offers["offers"][0]["provider"] == "local"
    metrics = await (await client.get("/metrics", headers=H)).text()
    assert 'gpuhop_jobs{status="queued"} 1.0' in metrics


async def test_oversized_body_is_413(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    resp = await client.post("/v1/jobs", data=b"x" * (2 * 1024 * 1024), headers=H)
    assert resp.status == 413


async def test_agent_reports_need_that_attempts_token(api) -> None:  # type: ignore[no-untyped-def]
    client, engine, key = api
    job = await (await client.post("/v1/jobs", json=SPEC, headers=H)).json()
    await engine.tick()  # launches attempt 1 locally
    name = f"gpuhop-{job['id']}-1"
    body = {"attempt": name, "event": "heartbeat", "log_offset": 0, "log": "hello\n"}
    assert (await client.post("/v1/agent/report", json=body, headers=H)).status == 401  # the API token is not it
    other = auth.attempt_token(key, f"gpuhop-{job['id']}-2")
    assert (await client.post("/v1/agent/report", json=body, headers={"Authorization": f"Bearer {other}"})).status == 401
    good = {"Authorization": f"Bearer {auth.attempt_token(key, name)}"}
    assert (await client.post("/v1/agent/report", json=body, headers=good)).status == 200
    assert (await client.post("/v1/agent/report", json=body, headers=good)).status == 200  # resent: written once
    assert (await client.post("/v1/agent/report", json={"attempt": name, "event": "dance"}, headers=good)).status == 422
    unknown = {"attempt": "gpuhop-ffffffff-1", "event": "start"}
    tok = {"Authorization": f"Bearer {auth.attempt_token(key, 'gpuhop-ffffffff-1')}"}
    assert (await client.post("/v1/agent/report", json=unknown, headers=tok)).status == 404
    for _ in range(50):  # let the job finish and the engine clean up
        await engine.tick()
        shown = await (await client.get(f"/v1/jobs/{job['id']}", headers=H)).json()
        if shown["status"] == "succeeded":
            break
        import asyncio

        await asyncio.sleep(0.1)
    assert shown["status"] == "succeeded"
    await engine.drain()


def test_log_chunks_are_written_once_at_their_offset(tmp_path: Path) -> None:
    from orchestrator.api.agent_routes import append_log

    path = tmp_path / "a.log"
    append_log(path, 0, "hello\n")
    append_log(path, 0, "hello\n")  # a retried report
    append_log(path, 6, "world\n")
    append_log(path, 3, "lo\nworld\nmore\n")  # overlaps what is there: only the new tail
    assert path.read_text() == "hello\nworld\nmore\n"
