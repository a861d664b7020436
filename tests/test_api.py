"""The REST API in-process (aiohttp test client) on a real store and the local provider: auth,
the OpenAPI document against the router and against what the server really sends, agent report
tokens and their append-only logs, and bad queries and specs."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import AppRunner, BaseRunner

from orchestrator import auth
from orchestrator.api.app import ApiContext, make_app
from orchestrator.api.openapi import openapi_document
from orchestrator.config import load_settings
from orchestrator.daemon import build_adapters
from orchestrator.engine import Engine
from orchestrator.models import JobSpec as JobSpecModel
from orchestrator.store import Store
from tests.conftest import stop_every_machine

TOKEN = "test-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"name": "api", "command": [sys.executable, "-c", "print(1)"], "resources": {"gpu_count": 0}}
# a job that writes nothing itself and lives until cancelled: its log is the agent reports'
QUIET = {"name": "quiet", "command": [sys.executable, "-c", "import time; time.sleep(600)"],
         "resources": {"gpu_count": 0}}

Api = tuple[TestClient, Engine, bytes]


class DaemonServer(TestServer):
    """aiohttp's TestServer cancels a handler whose client went away; `gpuhop serve` (a plain
    AppRunner) does not, and the API must end abandoned streams on its own. Run it like that."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        return AppRunner(self.app, **kwargs)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    settings = load_settings(None, {"server": {"state_dir": str(tmp_path)}})
    store = Store(settings.database_url())
    store.migrate()
    key = auth.agent_key(tmp_path)
    adapters = build_adapters(settings, tmp_path / "logs")
    engine = Engine(settings, store, adapters, lambda n: auth.attempt_token(key, n))
    if hasattr(engine, "start_providers"):
        engine.start_providers()
    app = make_app(ApiContext(store=store, engine=engine, token=TOKEN, agent_key=key, logs_dir=tmp_path / "logs"))
    client = TestClient(DaemonServer(app))
    await client.start_server()
    yield client, engine, key
    await stop_every_machine(engine.adapters)
    await client.close()
    store.close()


async def until(check: Callable[[], Awaitable[Any]], engine: Engine | None = None, timeout: float = 90,
                what: str = "condition") -> Any:
    """Tick the engine (when given) until `check` returns something truthy; generous deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if engine is not None:
            await engine.tick()
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


async def job_of(client: TestClient, job_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/jobs/{job_id}", headers=H)
    assert resp.status == 200
    return dict(await resp.json())


async def finish(client: TestClient, engine: Engine, job_id: str) -> None:
    """Cancel the job and wait until its machine is gone: no test leaves a process behind."""
    await client.post(f"/v1/jobs/{job_id}/cancel", headers=H)

    async def ended() -> bool:
        job = await job_of(client, job_id)
        return job["status"] == "cancelled" and all(a["status"] == "ended" for a in job["attempts"])

    await until(ended, engine, what=f"job {job_id} cancelled")
    await engine.drain()


def agent_headers(key: bytes, name: str, header: bool = True) -> dict[str, str]:
    out = {"Authorization": f"Bearer {auth.attempt_token(key, name)}"}
    if header:
        out["X-Gpuhop-Attempt"] = name
    return out


def check_schema(doc: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """The body against the response schema the document gives for it."""
    schema = doc["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**schema, "components": doc["components"]},
                        cls=jsonschema.Draft202012Validator, format_checker=jsonschema.FormatChecker())


async def test_everything_but_healthz_needs_the_token(api: Api) -> None:
    client, engine, _ = api
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/offers"), ("GET", "/metrics"),
                         ("GET", "/v1/openapi.json"), ("GET", "/v1/jobs/abc"), ("POST", "/v1/jobs/abc/cancel")]:
        resp = await client.request(method, path)
        assert resp.status == 401, path
        assert "bearer token" in (await resp.json())["error"]["message"]
        resp = await client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
    # no tick has run yet: the loop is not alive, and /healthz says so; after one, it is
    assert (await client.get("/healthz")).status == 503
    await engine.tick()
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["ok"] is True


async def test_openapi_documents_exactly_the_routes(api: Api) -> None:
    client, _, _ = api
    served = set()
    for route in client.app.router.routes():
        served.add((route.method.lower(), route.resource.canonical))
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented
    doc = await (await client.get("/v1/openapi.json", headers=H)).json()
    assert doc["components"]["schemas"]["JobSpec"]["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema({**doc["components"]["schemas"]["JobSpec"]})
    placement = doc["components"]["schemas"]["Placement"]["properties"]["providers"]["anyOf"]
    assert {"type": "string", "enum": ["local"]} in [o.get("items") for o in placement]


async def test_responses_match_the_document(api: Api) -> None:
    """What the live server sends, for every documented JSON response it can give here."""
    client, engine, key = api
    doc = await (await client.get("/v1/openapi.json", headers=H)).json()
    await engine.tick()
    resp = await client.get("/healthz")
    check_schema(doc, "/healthz", "get", resp.status, await resp.json())
    resp = await client.post("/v1/jobs", json={**QUIET, "volume": {"name": "doc-vol", "size_gb": 1}}, headers=H)
    assert resp.status == 201
    job = await resp.json()
    check_schema(doc, "/v1/jobs", "post", 201, job)
    name = f"gpuhop-{job['id']}-1"

    async def running() -> bool:
        return (await job_of(client, job["id"]))["status"] == "running"

    await until(running, engine, what="the job running")
    resp = await client.get(f"/v1/jobs/{job['id']}", headers=H)
    shown = await resp.json()
    assert shown["volume"]["name"] == "doc-vol" and shown["attempts"][0]["status"] == "running"
    check_schema(doc, "/v1/jobs/{job_id}", "get", 200, shown)
    resp = await client.get("/v1/jobs", headers=H)
    check_schema(doc, "/v1/jobs", "get", 200, await resp.json())
    resp = await client.get("/v1/offers", headers=H)
    check_schema(doc, "/v1/offers", "get", 200, await resp.json())
    resp = await client.get("/v1/volumes", headers=H)
    volumes = await resp.json()
    check_schema(doc, "/v1/volumes", "get", 200, volumes)
    [vol] = volumes["volumes"]
    assert (vol["name"], vol["provider"], vol["jobs"], vol["active_job"]) == ("doc-vol", "local", 1, job["id"])
    assert vol["storage_usd_per_month"] == 0 and volumes["storage_usd_per_month"] == 0  # local disk is free
    resp = await client.post("/v1/jobs", json={**QUIET, "volume": {"name": "doc-vol"}}, headers=H)
    assert resp.status == 409  # the volume is the first job's
    body = await resp.json()
    assert "doc-vol" in body["error"]["message"]
    check_schema(doc, "/v1/jobs", "post", 409, body)
    report = {"attempt": name, "event": "heartbeat", "log_offset": 0, "log": "x\n"}
    resp = await client.post("/v1/agent/report", json=report, headers=agent_headers(key, name))
    assert resp.status == 200
    check_schema(doc, "/v1/agent/report", "post", 200, await resp.json())
    resp = await client.post("/v1/agent/report", json={**report, "log_offset": 7}, headers=agent_headers(key, name))
    assert resp.status == 409
    check_schema(doc, "/v1/agent/report", "post", 409, await resp.json())
    resp = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=H)
    check_schema(doc, "/v1/jobs/{job_id}/cancel", "post", 202, await resp.json())
    await finish(client, engine, job["id"])
    resp = await client.get("/v1/jobs/ffff", headers=H)
    check_schema(doc, "/v1/jobs/{job_id}", "get", 404, await resp.json())


async def test_the_dashboard_is_public_and_its_data_is_not(api: Api) -> None:
    """The page and its script are served to anyone (they hold no data) with headers that keep
    hostile text inert; everything they show comes from /v1 with the token."""
    client, _, _ = api
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert '<script src="/ui/app.js"' in page and "<script>" not in page  # no inline code: CSP holds
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["X-Content-Type-Options"] == "nosniff"
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp = await client.get(f"/ui/{name}")
        assert resp.status == 200 and resp.content_type == ctype, name
    script = await (await client.get("/ui/app.js")).text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script  # text only, never markup
    assert (await client.get("/ui/../token")).status in (401, 404)
    assert (await client.get("/ui/secret.txt")).status == 401  # not a dashboard file: the API's rules
    assert (await client.get("/ui/secret.txt", headers=H)).status == 404
    for path in ("/v1/volumes", "/v1/jobs", "/v1/status"):
        assert (await client.get(path)).status == 401, path


async def test_submit_list_show_and_filters(api: Api) -> None:
    client, engine, _ = api
    resp = await client.post("/v1/jobs", json=SPEC, headers=H)
    assert resp.status == 201
    job = await resp.json()
    assert job["status"] == "queued" and len(job["id"]) == 8
    listed = await (await client.get("/v1/jobs?status=queued", headers=H)).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert (await (await client.get("/v1/jobs?status=running", headers=H)).json())["jobs"] == []
    for bad in ("status=bogus", "limit=x", "limit=0", "limit=%EF%BC%91", "limit=+5", "limit=" + "9" * 5001):
        assert (await client.get(f"/v1/jobs?{bad}", headers=H)).status == 400, bad
    assert (await client.get("/v1/jobs/../../etc", headers=H)).status == 404
    assert (await client.get("/v1/jobs/ffffffff", headers=H)).status == 404
    shown = await job_of(client, job["id"])
    assert shown["events"][0]["kind"] == "submitted"
    for bad in ("tail=-1", "tail=1.5", "follow=maybe", "attempt=0"):
        assert (await client.get(f"/v1/jobs/{job['id']}/logs?{bad}", headers=H)).status == 400, bad

    async def some_offers() -> list[dict[str, Any]]:
        return list((await (await client.get("/v1/offers", headers=H)).json())["offers"])

    offers = await until(some_offers, what="the local provider's offers")
    assert offers[0]["provider"] == "local"
    metrics = await (await client.get("/metrics", headers=H)).text()
    assert 'gpuhop_jobs{status="queued"} 1.0' in metrics


async def test_pages_by_cursor_see_every_job_once_while_jobs_arrive(api: Api) -> None:
    """Keyset pages: newest first, each job on exactly one page, even when jobs are submitted
    between pages and several share one creation time."""
    client, engine, _ = api
    now = time.time()
    for i in range(23):  # a burst of jobs with one creation time: the id breaks the tie
        engine.store.create_job(f"a{i:07d}", JobSpecModel.model_validate({**SPEC, "name": f"p{i}"}), now)
    for i in range(4):
        engine.store.create_job(f"b{i:07d}", JobSpecModel.model_validate({**SPEC, "name": f"q{i}"}), now - 10 - i)
    expected = [j.id for j in engine.store.list_jobs(limit=100)]
    assert len(expected) == 27
    seen: list[str] = []
    url = "/v1/jobs?limit=5"
    while True:
        page = await (await client.get(url, headers=H)).json()
        seen += [j["id"] for j in page["jobs"]]
        if len(seen) == 10:  # a newer job arrives meanwhile: it belongs before page 1, not in a later page
            engine.store.create_job("c0000000", JobSpecModel.model_validate({**SPEC, "name": "late"}), now + 5)
        if page["next_cursor"] is None:
            break
        url = f"/v1/jobs?limit=5&cursor={page['next_cursor']}"
    assert seen == expected, "a job was skipped or shown twice across pages"
    for bad in ("cursor=", "cursor=zz", "cursor=7ff0000000000000.abc", "cursor=" + "0" * 16 + ".ABC",
                "cursor=" + "0" * 16 + ".a%0A"):
        resp = await client.get(f"/v1/jobs?{bad}", headers=H)
        assert resp.status == 400, bad
        assert "cursor" in (await resp.json())["error"]["message"]


async def test_a_job_no_provider_could_run_is_refused_unless_forced(api: Api) -> None:
    """This machine's local provider has no GPU: a GPU job would queue forever. Once the
    provider's offers are known, submit says so, with what is offered; --force queues it."""
    client, engine, _ = api

    async def some_offers() -> list[dict[str, Any]]:
        return list((await (await client.get("/v1/offers", headers=H)).json())["offers"])

    offers = await until(some_offers, what="the local provider's offers")
    if any(o["gpu"] for o in offers):
        pytest.skip("this machine has a GPU: the local provider could run a GPU job")
    gpu_job = {**SPEC, "resources": {"gpu": ["H100"]}}
    resp = await client.post("/v1/jobs", json=gpu_job, headers=H)
    assert resp.status == 422
    err = (await resp.json())["error"]
    assert err["code"] == "unsatisfiable"
    assert "wrong GPU" in err["message"] and "local offers CPU-only machines" in err["message"]
    assert "--force" in err["message"]
    assert engine.store.list_jobs() == [], "a refused job was stored"
    resp = await client.post("/v1/jobs?force=true", json=gpu_job, headers=H)
    assert resp.status == 201
    forced = (await resp.json())["id"]

    async def says_why() -> str | None:  # the queued job says why it waits, in words
        message = str((await job_of(client, forced))["message"])
        return message if message != "queued" else None

    message = await until(says_why, engine, what="the forced job's reason to wait")
    assert message.startswith("no configured provider offers what this job asks for"), message
    assert "local offers CPU-only machines" in message
    assert (await client.post("/v1/jobs", json=SPEC, headers=H)).status == 201  # a CPU job is fine
    assert (await client.post("/v1/jobs?force=maybe", json=SPEC, headers=H)).status == 400


async def test_costs_report_and_metric(api: Api) -> None:
    client, engine, _ = api
    resp = await client.post("/v1/jobs", json=SPEC, headers=H)
    job_id = (await resp.json())["id"]

    async def ended() -> bool:
        return (await job_of(client, job_id))["status"] == "succeeded"

    await until(ended, engine, what="the local job finished")
    for by in ("provider", "job", "day"):
        report = await (await client.get(f"/v1/costs?by={by}&since=1h", headers=H)).json()
        assert report["by"] == by and report["total"]["attempts"] == 1, report
        assert len(report["lines"]) == 1 and report["lines"][0]["attempts"] == 1
    assert (await (await client.get("/v1/costs?by=job", headers=H)).json())["lines"][0]["key"].startswith(job_id)
    for bad in ("since=7", "since=-1d", "since=7w", "by=week", "since=" + "9" * 7 + "d"):
        assert (await client.get(f"/v1/costs?{bad}", headers=H)).status == 400, bad
    text = await (await client.get("/metrics", headers=H)).text()
    assert 'gpuhop_cost_usd_total{capacity="on-demand",provider="local"}' in text


async def test_wrong_method_is_405_with_allow(api: Api) -> None:
    client, _, _ = api
    resp = await client.put("/v1/jobs", headers=H)
    assert resp.status == 405
    assert set(resp.headers["Allow"].split(",")) == {"GET", "POST"}
    assert "error" in await resp.json()
    resp = await client.delete("/v1/offers", headers=H)
    assert resp.status == 405 and resp.headers["Allow"] == "GET"


@pytest.mark.parametrize("field, value, where", [
    ("name", "job\n", "name"),
    ("volume", {"name": "vol\n"}, "volume.name"),
    ("env", {"KEY\n": "v"}, "env"),
    ("placement", {"regions": ["EU\n"]}, "placement.regions"),
    ("resources", {"gpu_count": True}, "resources.gpu_count"),
    ("resources", {"gpu_count": "1"}, "resources.gpu_count"),
    ("resources", {"gpu_count": 0, "disk_gb": 1.5}, "resources.disk_gb"),
    ("resources", {"gpu_count": None}, "resources.gpu_count"),
    ("policy", {"max_relaunches": False}, "policy.max_relaunches"),
    ("policy", {"max_cost_usd": "5"}, "policy.max_cost_usd"),
    ("placement", {"max_price_per_hour": True}, "placement.max_price_per_hour"),
    ("command", ["python3", "\ud800"], "command"),
    ("env", {"A": "\udcff"}, "env"),
])
async def test_specs_are_checked_whole_and_strictly(api: Api, field: str, value: Any, where: str) -> None:
    client, _, _ = api
    spec = {**SPEC, field: value}
    if field == "resources" and "gpu_count" not in value:
        spec[field] = {**value, "gpu_count": 0}
    raw = json.dumps(spec).encode()  # ensure_ascii: a lone surrogate travels as \ud800
    resp = await client.post("/v1/jobs", data=raw, headers={**H, "Content-Type": "application/json"})
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["error"]["message"].startswith(where + ":")
    assert (await (await client.get("/v1/jobs", headers=H)).json())["jobs"] == []


async def test_agent_reports_need_that_attempts_token(api: Api, tmp_path: Path) -> None:
    client, engine, key = api
    job = await (await client.post("/v1/jobs", json=QUIET, headers=H)).json()
    name = f"gpuhop-{job['id']}-1"

    async def launched() -> bool:
        return bool((await job_of(client, job["id"]))["attempts"])

    await until(launched, engine, what="attempt 1 recorded")
    body = {"attempt": name, "event": "heartbeat", "log_offset": 0, "log": "hello\n"}
    assert (await client.post("/v1/agent/report", json=body, headers=H)).status == 401  # the API token is not it
    other = agent_headers(key, f"gpuhop-{job['id']}-2")
    assert (await client.post("/v1/agent/report", json=body, headers=other)).status == 401
    other_in_body = {"Authorization": other["Authorization"]}
    assert (await client.post("/v1/agent/report", json=body, headers=other_in_body)).status == 401
    # a token for attempt 2 with a header naming attempt 2 and a body naming attempt 1
    assert (await client.post("/v1/agent/report", json=body, headers=other)).status == 401
    good = agent_headers(key, name)
    resp = await client.post("/v1/agent/report", json=body, headers=good)
    assert resp.status == 200 and (await resp.json())["log_size"] == 6
    resp = await client.post("/v1/agent/report", json=body, headers=good)  # resent: acknowledged, written once
    assert resp.status == 200 and (await resp.json())["log_size"] == 6
    # today's agent names its attempt in the body only: still understood
    legacy = agent_headers(key, name, header=False)
    more = {**body, "log_offset": 6, "log": "world\n"}
    assert (await client.post("/v1/agent/report", json=more, headers=legacy)).status == 200
    log = tmp_path / "logs" / f"{name}.log"
    assert log.read_bytes() == b"hello\nworld\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert (await client.post("/v1/agent/report", json={"attempt": name, "event": "dance"}, headers=good)).status == 422
    unknown = "gpuhop-ffffffff-1"
    resp = await client.post("/v1/agent/report", json={"attempt": unknown, "event": "start"},
                             headers=agent_headers(key, unknown))
    assert resp.status == 404
    await finish(client, engine, job["id"])


async def test_log_chunks_are_append_only(api: Api, tmp_path: Path) -> None:
    client, engine, key = api
    job = await (await client.post("/v1/jobs", json=QUIET, headers=H)).json()
    name = f"gpuhop-{job['id']}-1"
    good = agent_headers(key, name)

    async def running() -> bool:
        return (await job_of(client, job["id"]))["status"] == "running"

    await until(running, engine, what="the job running")

    async def send(offset: int, text: str) -> tuple[int, dict[str, Any]]:
        body = {"attempt": name, "event": "heartbeat", "log_offset": offset, "log": text}
        resp = await client.post("/v1/agent/report", json=body, headers=good)
        return resp.status, await resp.json()

    assert (await send(0, "hello\n"))[0] == 200
    status, body = await send(0, "HELLO\n")  # same place, other bytes: never overwritten
    assert status == 409 and body["expected_offset"] == 6
    status, body = await send(9, "gap\n")  # past the end: would leave a hole
    assert status == 409 and body["expected_offset"] == 6
    assert (await send(3, "lo\nworld\n"))[0] == 200  # a resend that grew: only the new tail
    # bytes that are not UTF-8, as an agent escapes them, land exactly
    assert (await send(12, "caf\udce9\n"))[0] == 200
    log = tmp_path / "logs" / f"{name}.log"
    assert log.read_bytes() == b"hello\nworld\ncaf\xe9\n"
    await finish(client, engine, job["id"])


async def test_an_ended_attempt_is_gone(api: Api, tmp_path: Path) -> None:
    client, engine, key = api
    job = await (await client.post("/v1/jobs", json=SPEC, headers=H)).json()

    async def succeeded() -> bool:
        return (await job_of(client, job["id"]))["status"] == "succeeded"

    await until(succeeded, engine, what="the job succeeded")
    await engine.drain()
    name = f"gpuhop-{job['id']}-1"
    log = tmp_path / "logs" / f"{name}.log"
    before = log.read_bytes() if log.exists() else b""
    body = {"attempt": name, "event": "heartbeat", "log_offset": len(before), "log": "late\n"}
    for headers in (agent_headers(key, name), agent_headers(key, name, header=False)):
        resp = await client.post("/v1/agent/report", json=body, headers=headers)
        assert resp.status == 410
        assert "ended" in (await resp.json())["error"]["message"]
    assert (log.read_bytes() if log.exists() else b"") == before
