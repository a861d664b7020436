"""The workdir endpoints in-process on a real store: an upload is stored only when its bytes hash
to its URL, fit [workdirs] max_mb and unpack safely; a job naming an archive never uploaded is
refused at submit; an agent gets its job's archive with its own attempt's token and nothing else."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from orchestrator import auth, workdir
from orchestrator.api.app import ApiContext, make_app
from orchestrator.config import load_settings
from orchestrator.daemon import build_adapters
from orchestrator.engine import Engine
from orchestrator.models import JobSpec as JobSpecModel
from orchestrator.store import Store
from tests.conftest import stop_every_machine
from tests.test_api import SPEC, TOKEN, Api, DaemonServer, H, agent_headers, finish, job_of, until
from tests.test_workdir import UNSAFE


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The API on SQLite and the local provider, as tests/test_api.py has it."""
    settings = load_settings(None, {"server": {"state_dir": str(tmp_path)}})
    store = Store(settings.database_url())
    store.migrate()
    key = auth.agent_key(tmp_path)
    engine = Engine(settings, store, build_adapters(settings, tmp_path / "logs"),
                    lambda n: auth.attempt_token(key, n))
    engine.start_providers()
    app = make_app(ApiContext(store=store, engine=engine, token=TOKEN, agent_key=key, logs_dir=tmp_path / "logs"))
    client = TestClient(DaemonServer(app))
    await client.start_server()
    yield client, engine, key
    await stop_every_machine(engine.adapters)
    await client.close()
    store.close()


def small_archive(tmp_path: Path, text: str = "print('hi')\n") -> bytes:
    root = tmp_path / "w"
    root.mkdir(exist_ok=True)
    (root / "main.py").write_text(text)
    return workdir.pack(root)[0]


async def test_upload_is_content_addressed_and_checked(api: Api, tmp_path: Path) -> None:
    client, _, _ = api
    data = small_archive(tmp_path)
    sha = workdir.sha256(data)
    assert (await client.put(f"/v1/workdirs/{sha}", data=data)).status == 401  # the API token is needed
    resp = await client.put(f"/v1/workdirs/{sha}", data=data, headers=H)
    assert resp.status == 201 and (await resp.json())["size"] == len(data)
    assert (await client.put(f"/v1/workdirs/{sha}", data=data, headers=H)).status == 200  # once is enough

    other = small_archive(tmp_path, "print('other')\n")
    other_sha = workdir.sha256(other)
    resp = await client.put(f"/v1/workdirs/{other_sha}", data=data, headers=H)  # the wrong bytes
    assert resp.status == 422
    body = await resp.json()
    assert body["error"]["code"] == "sha256_mismatch" and sha in body["error"]["message"]
    assert (await client.put("/v1/workdirs/NOT-A-SHA", data=data, headers=H)).status == 400

    # nothing was stored under the mismatched name: a job naming it is refused at submit
    resp = await client.post("/v1/jobs", json={**SPEC, "workdir_sha256": other_sha}, headers=H)
    assert resp.status == 422
    body = await resp.json()
    assert body["error"]["code"] == "unknown_workdir" and f"/v1/workdirs/{other_sha}" in body["error"]["message"]
    resp = await client.post("/v1/jobs", json={**SPEC, "workdir_sha256": "abc"}, headers=H)
    assert resp.status == 422 and "workdir_sha256" in (await resp.json())["error"]["message"]


async def test_upload_over_the_limit_or_unsafe_is_refused(api: Api, tmp_path: Path) -> None:
    client, engine, _ = api
    root = tmp_path / "w"
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(3 << 20))  # bigger than any JSON body the API takes
    data = workdir.pack(root)[0]
    assert (await client.put(f"/v1/workdirs/{workdir.sha256(data)}", data=data, headers=H)).status == 201
    assert engine.settings.workdirs.max_mb == 50  # the default; a smaller one keeps the test quick
    engine.settings.workdirs.max_mb = 0.25
    big = bytes(256 * 1024 + 1)
    resp = await client.put(f"/v1/workdirs/{workdir.sha256(big)}", data=big, headers=H)
    assert resp.status == 413
    message = (await resp.json())["error"]["message"]
    assert "256.0 KB" in message and "max_mb" in message
    for kind in ("absolute", "dotdot", "symlink_out", "device", "not_gzip"):
        data = UNSAFE[kind]
        resp = await client.put(f"/v1/workdirs/{workdir.sha256(data)}", data=data, headers=H)
        assert resp.status == 422, kind
        assert "nothing was stored" in (await resp.json())["error"]["message"]


async def test_the_agent_gets_its_jobs_archive_with_its_attempts_token(api: Api, tmp_path: Path) -> None:
    client, engine, key = api
    data = small_archive(tmp_path)
    sha = workdir.sha256(data)
    assert (await client.put(f"/v1/workdirs/{sha}", data=data, headers=H)).status == 201
    resp = await client.post("/v1/jobs", json={**SPEC, "command": ["sleep", "600"], "workdir_sha256": sha},
                             headers=H)
    assert resp.status == 201
    job = await resp.json()
    name = f"gpuhop-{job['id']}-1"

    async def launched() -> bool:
        return bool((await job_of(client, job["id"]))["attempts"])

    await until(launched, engine, what="attempt 1 recorded")
    assert (await client.get("/v1/agent/workdir", headers=H)).status == 401  # the API token is not it
    other = agent_headers(key, f"gpuhop-{job['id']}-2")
    assert (await client.get("/v1/agent/workdir", headers={**other, "X-Gpuhop-Attempt": name})).status == 401
    resp = await client.get("/v1/agent/workdir", headers=agent_headers(key, name))
    assert resp.status == 200 and resp.headers["X-Gpuhop-Sha256"] == sha
    got = await resp.read()
    assert got == data
    with tarfile.open(fileobj=io.BytesIO(got), mode="r:gz") as tar:
        assert tar.getnames() == ["main.py"]
    await finish(client, engine, job["id"])


def test_archives_are_shared_through_the_database(db_url: str, tmp_path: Path) -> None:
    """Two stores on one database, as two replicas: what one stored, the other serves; storing
    the same archive again, from either, changes nothing."""
    one, two = Store(db_url), Store(db_url)
    try:
        one.migrate()
        data = small_archive(tmp_path)
        sha = workdir.sha256(data)
        assert not two.has_workdir(sha) and two.workdir_data(sha) is None
        assert one.put_workdir(sha, data, 12) is True
        assert two.has_workdir(sha) and two.workdir_data(sha) == data
        assert two.put_workdir(sha, data, 12) is False
        assert one.workdir_data(sha) == data
    finally:
        one.close()
        two.close()


def test_old_archives_go_once_no_unfinished_job_names_them(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url)
    try:
        store.migrate()
        data = small_archive(tmp_path)
        sha = workdir.sha256(data)
        store.put_workdir(sha, data, 9, now=1000.0)
        spec = JobSpecModel.model_validate({**SPEC, "workdir_sha256": sha})
        store.create_job("j1", spec, now=1000.0)
        assert store.prune_workdirs(older_than=5000.0) == 0  # its job has not ended
        store.update_job("j1", status="succeeded")
        store.put_workdir(sha, data, 9, now=6000.0)  # uploaded again for a new job: young again
        assert store.prune_workdirs(older_than=5000.0) == 0
        assert store.prune_workdirs(older_than=7000.0) == 1
        assert not store.has_workdir(sha)
    finally:
        store.close()
