"""Checkpoint sync through object storage, in-process: the manifest rules (pure), `[storage]`
configuration errors, the submit refusal without `[storage]`, and the agent endpoints on a real
store against the S3 simulator (SigV4 checked): a checkpoint whose blobs are not all stored is
never committed nor restored, a stale attempt cannot write over a newer one's checkpoint, and
the agent's Syncer restores and uploads through the URLs it is handed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from orchestrator import agent, auth
from orchestrator import checkpoints as cp
from orchestrator.api.app import ApiContext, make_app
from orchestrator.config import ConfigError, load_settings
from orchestrator.daemon import build_adapters, configured_secrets
from orchestrator.engine import Engine
from orchestrator.models import AttemptStatus, JobSpec, VolumeSpec
from orchestrator.objectstore import ObjectStore
from orchestrator.store import Store
from orchestrator.store.tables import AttemptRow
from simulators.s3 import S3Simulator
from tests.test_api import TOKEN, H

KEY_ID, SECRET, BUCKET = "AKIAGPUHOPUNITTEST01", "unit-Secret-0123456789abcdefghijklmnop", "ckpt"
SHA_A = hashlib.sha256(b"a").hexdigest()


def entry(path: str, data: bytes, mode: int = 0o644) -> dict[str, Any]:
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": mode}


# ------------------------------------------------------------------ pure rules
@pytest.mark.parametrize("path", ["", "/abs", "a/../b", "a//b", "./a", ".gpuhop/x", "a\\b", "a\x00b"])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        cp.check_path(path)


def test_manifest_files_are_sorted_unique_and_not_both_file_and_dir() -> None:
    files = [cp.FileEntry(**entry("b", b"x")), cp.FileEntry(**entry("a/c", b"y"))]
    assert [f.path for f in cp.check_files(files)] == ["a/c", "b"]
    with pytest.raises(ValueError, match="twice"):
        cp.check_files([cp.FileEntry(**entry("a", b"x")), cp.FileEntry(**entry("a", b"y"))])
    with pytest.raises(ValueError, match="both a file and a directory"):
        cp.check_files([cp.FileEntry(**entry("a", b"x")), cp.FileEntry(**entry("a/b", b"y"))])


def test_keys_sort_by_seq_and_problems_name_missing_or_short_blobs() -> None:
    keys = [cp.manifest_key("p", "v", n) for n in (2, 10, 1)] + ["p/volumes/v/manifests/junk.json"]
    assert cp.seqs_newest_first(keys) == [10, 2, 1]
    assert cp.blob_key("", "v", SHA_A) == f"volumes/v/blobs/{SHA_A}"
    assert cp.problems({SHA_A: 1}, {SHA_A: 1}) == []
    assert sorted(cp.problems({SHA_A: 1, "b" * 64: 5}, {SHA_A: 0, "b" * 64: None})) == [
        "blob bbbbbbbbbbbb is missing", f"blob {SHA_A[:12]} holds 0 bytes, not 1"]


@pytest.mark.parametrize(("latest", "local", "restore"), [(None, None, False), (3, None, True), (3, 2, True),
                                                          (3, 3, False), (3, 4, False)])
def test_restore_plan(latest: int | None, local: int | None, restore: bool) -> None:
    assert cp.restore_plan(latest, local) is restore


def test_commit_fence_keeps_a_later_attempts_checkpoint() -> None:
    m = cp.Manifest(volume="v", seq=4, job_id="j", attempt=3, created_at=0, files=[])
    assert cp.commit_refusal(None, "j", 1) is None
    assert cp.commit_refusal(m, "j", 3) is None and cp.commit_refusal(m, "j", 4) is None
    assert "attempt 3" in (cp.commit_refusal(m, "j", 2) or "")
    assert cp.commit_refusal(m, "other-job", 1) is None  # a new job on a kept volume


# ------------------------------------------------------------------ configuration
def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_settings(path)


@pytest.mark.parametrize(("text", "said"), [
    ("[storage]\nendpoint_url = 'http://x'\n", "storage.bucket: Field required"),
    ("[storage]\nbucket = 7\n", "storage.bucket: Input should be a valid string"),
    ("[storage]\nbucket = 'b'\n", "storage.bucket: String should have at least 3 characters"),
    ("[storage]\nbucket = 'ckpt'\npresign_ttl_seconds = 'soon'\n", "storage.presign_ttl_seconds"),
    ("[storage]\nbucket = 'ckpt'\nendpoint_url = 'minio:9000'\n", "expected an http:// or https:// URL"),
    ("[storage]\nbucket = 'ckpt'\naccess_key_id = 'AKIA1234'\n", "give access_key_id and secret_access_key together"),
    ("[storage]\nbucket = 'ckpt'\nsecret_key = 'x'\n", "storage.secret_key: unknown key"),
])
def test_storage_config_errors_say_which_key(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert said in str(err.value)


def test_storage_secret_is_redacted_and_hidden(tmp_path: Path) -> None:
    s = _load(tmp_path, f"[storage]\nbucket = 'ckpt'\naccess_key_id = '{KEY_ID}'\nsecret_access_key = '{SECRET}'\n")
    assert SECRET in configured_secrets(s) and SECRET not in repr(s) and SECRET not in str(s.model_dump())


def test_example_config_documents_storage() -> None:
    text = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    assert "# [storage]" in text and "# sync_interval_seconds" in text


# ------------------------------------------------------------------ endpoints on a real store + S3 simulator
@pytest.fixture
def s3() -> Iterator[S3Simulator]:
    sim = S3Simulator(KEY_ID, SECRET, buckets=[BUCKET])
    sim.start()
    yield sim
    sim.stop()


class Env:
    def __init__(self, client: TestClient, store: Store, key: bytes, s3: S3Simulator | None) -> None:
        self.client, self.store, self.key, self.s3 = client, store, key, s3

    def attempt(self, job_id: str, number: int, status: str = AttemptStatus.RUNNING.value) -> dict[str, str]:
        name = f"gpuhop-{job_id}-{number}"
        for older in self.store.attempts(job_id):  # one live attempt per job: the older one ended
            self.store.update_attempt(older.id or 0, status=AttemptStatus.ENDED.value)
        self.store.add_attempt(AttemptRow(job_id=job_id, number=number, name=name, provider="runpod",
                                          status=status, created_at=time.time()))
        return {"Authorization": f"Bearer {auth.attempt_token(self.key, name)}", "X-Gpuhop-Attempt": name}

    def job(self, volume: str = "vol", sync: str = "object-store") -> str:
        spec = JobSpec.model_validate({"name": "s", "command": ["true"], "resources": {"gpu_count": 0},
                                       "volume": {"name": volume, "sync": sync}})
        job_id = f"j{time.monotonic_ns() % 10**8:08d}"
        self.store.create_job(job_id, spec)
        return job_id

    async def post(self, what: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        resp = await self.client.post(f"/v1/agent/sync/{what}", json=body, headers=headers)
        return resp.status, await resp.json()

    def get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return bytes(resp.read())

    def put(self, url: str, data: bytes) -> None:
        req = urllib.request.Request(url, data=data, method="PUT")
        urllib.request.urlopen(req, timeout=10).close()


async def _env(tmp_path: Path, s3: S3Simulator | None) -> tuple[Env, ObjectStore | None]:
    storage = {"endpoint_url": s3.url, "bucket": BUCKET, "prefix": "u", "access_key_id": KEY_ID,
               "secret_access_key": SECRET, "presign_ttl_seconds": 30} if s3 else {}
    settings = load_settings(None, {"server": {"state_dir": str(tmp_path)}, "storage": storage})
    store = Store(settings.database_url())
    store.migrate()
    key = auth.agent_key(tmp_path)
    engine = Engine(settings, store, build_adapters(settings, tmp_path / "logs"), lambda n: auth.attempt_token(key, n))
    objects = ObjectStore(settings.storage) if settings.storage else None
    app = make_app(ApiContext(store=store, engine=engine, token=TOKEN, agent_key=key, logs_dir=tmp_path / "logs",
                              objects=objects))
    client = TestClient(TestServer(app))
    await client.start_server()
    return Env(client, store, key, s3), objects


@pytest.fixture
async def env(tmp_path: Path, s3: S3Simulator) -> AsyncIterator[Env]:
    e, _ = await _env(tmp_path, s3)
    yield e
    await e.client.close()
    e.store.close()


async def test_submit_with_object_store_sync_needs_storage(tmp_path: Path) -> None:
    e, _ = await _env(tmp_path, None)
    try:
        spec = {"name": "s", "command": [sys.executable, "-c", "1"], "resources": {"gpu_count": 0},
                "volume": {"name": "v", "sync": "object-store"}}
        resp = await e.client.post("/v1/jobs", json=spec, headers=H)
        body = await resp.json()
        assert resp.status == 422 and body["error"]["code"] == "no_object_store"
        assert "[storage]" in body["error"]["message"]
        assert e.store.list_jobs() == []  # nothing recorded
    finally:
        await e.client.close()
        e.store.close()


async def test_a_half_written_checkpoint_is_never_committed_nor_restored(env: Env) -> None:
    job = env.job()
    h1 = env.attempt(job, 1)
    # a complete checkpoint 1
    one = [entry("ckpt.json", b'{"step": 1}'), entry("steps.log", b"1\n")]
    status, up = await env.post("upload", h1, {"blobs": [{"sha256": f["sha256"], "size": f["size"]} for f in one]})
    assert status == 200 and len(up["upload"]) == 2
    data = {hashlib.sha256(b).hexdigest(): b for b in (b'{"step": 1}', b"1\n")}
    for item in up["upload"]:
        env.put(item["url"], data[item["sha256"]])
    status, done = await env.post("commit", h1, {"files": one})
    assert (status, done["seq"]) == (200, 1)

    # checkpoint 2: one blob uploaded short, one never uploaded -> refused, nothing written
    two = [entry("ckpt.json", b'{"step": 2}'), entry("steps.log", b"1\n2\n")]
    status, up = await env.post("upload", h1, {"blobs": [{"sha256": f["sha256"], "size": f["size"]} for f in two]})
    env.put(up["upload"][0]["url"], b"{")
    status, refused = await env.post("commit", h1, {"files": two})
    assert status == 409 and refused["error"]["code"] == "incomplete", refused
    assert any("missing" in p for p in refused["problems"]) and any("holds 1 bytes" in p for p in refused["problems"])
    # blobs uploaded in full but the manifest never committed (the machine died): still not restorable
    for item in up["upload"]:
        env.put(item["url"], {f["sha256"]: b for f, b in zip(two, (b'{"step": 2}', b"1\n2\n"), strict=True)}[item["sha256"]])
    # a manifest planted with a blob that is not there is skipped too
    assert env.s3 is not None
    env.s3.client().put_object(Bucket=BUCKET, Key=cp.manifest_key("u", "vol", 2), Body=cp.Manifest(
        volume="vol", seq=2, job_id=job, attempt=1, created_at=0, files=[entry("x", b"gone")]).model_dump_json())
    env.s3.client().put_object(Bucket=BUCKET, Key=cp.manifest_key("u", "vol", 3), Body=b"{not json")

    h2 = env.attempt(job, 2)
    status, plan = await env.post("restore", h2, {"local_seq": None})
    assert status == 200 and plan["seq"] == 1 and plan["restore"] is True
    got = {f["path"]: await asyncio.to_thread(env.get, f["url"]) for f in plan["files"]}
    assert got == {"ckpt.json": b'{"step": 1}', "steps.log": b"1\n"}
    # a volume that holds checkpoint 1 (or newer) is left as it is
    assert (await env.post("restore", h2, {"local_seq": 1}))[1] == {"seq": 1, "restore": False, "files": []}


async def test_a_stale_attempt_cannot_write_over_a_newer_checkpoint(env: Env) -> None:
    job = env.job("fenced")
    h1, h2 = env.attempt(job, 1, AttemptStatus.ENDED.value), env.attempt(job, 2)
    assert (await env.post("commit", h1, {"files": []}))[0] == 200  # an ended attempt's final sync
    assert (await env.post("commit", h2, {"files": []}))[1]["seq"] == 2
    status, body = await env.post("commit", h1, {"files": []})
    assert status == 409 and body["error"]["code"] == "superseded"
    assert (await env.post("restore", h1, {}))[0] == 410  # an ended attempt restores nothing


async def test_sync_endpoints_refuse_wrong_tokens_and_unsynced_volumes(env: Env) -> None:
    job = env.job("plain", sync="none")
    h = env.attempt(job, 1)
    assert (await env.post("restore", h, {}))[0] == 409
    other = env.attempt(env.job("other"), 1)
    forged = {**other, "X-Gpuhop-Attempt": h["X-Gpuhop-Attempt"]}
    assert (await env.post("upload", forged, {"blobs": []}))[0] == 401
    assert (await env.post("commit", {}, {"files": []}))[0] == 401
    bad = [{"path": "../etc/passwd", "sha256": SHA_A, "size": 1, "mode": 0o644}]
    status, body = await env.post("commit", other, {"files": bad})
    assert status == 422 and "'..'" in body["error"]["message"]


async def test_presigned_urls_expire_and_forgeries_are_refused(env: Env) -> None:
    job = env.job("expiry")
    h = env.attempt(job, 1)
    _, up = await env.post("upload", h, {"blobs": [{"sha256": SHA_A, "size": 1}]})
    url = up["upload"][0]["url"]
    assert SECRET not in json.dumps(up) and f"X-Amz-Credential={KEY_ID}%2F" in url
    with pytest.raises(urllib.error.HTTPError) as err:
        env.put(url.replace("X-Amz-Signature=", "X-Amz-Signature=f"), b"a")
    assert err.value.code == 403 and b"SignatureDoesNotMatch" in err.value.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        env.put(url.replace("X-Amz-Expires=30", "X-Amz-Expires=3000"), b"a")  # a longer life is not granted
    assert err.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as err:
        env.put(url.replace("X-Amz-Date=2", "X-Amz-Date=1"), b"a")  # long ago: expired
    assert err.value.code == 403 and b"expired" in err.value.read()
    env.put(url, b"a")


async def test_agent_syncer_round_trip(env: Env, tmp_path: Path) -> None:
    """The agent's own Syncer (threads, urllib) against the in-process daemon: upload a volume,
    restore it into an empty one, leave `.gpuhop/` alone, commit nothing when nothing changed."""
    job = env.job("roundtrip")
    h1 = env.attempt(job, 1)
    base = str(env.client.make_url("/v1/agent/report"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "model.bin").write_bytes(b"\x00" * 300_000)
    (src / "ckpt.json").write_text('{"step": 7}')
    (src / ".gpuhop").mkdir()
    (src / ".gpuhop" / "secret-marker").write_text("agent's own")
    one = agent.Syncer(agent.Reporter(base, h1["Authorization"].split()[1], h1["X-Gpuhop-Attempt"], None), str(src))
    assert await asyncio.to_thread(one.upload)
    assert one._state()["seq"] == 1
    assert await asyncio.to_thread(one.upload) and one._state()["seq"] == 1  # unchanged: no new checkpoint
    (src / "ckpt.json").write_text('{"step": 8}')
    assert await asyncio.to_thread(one.upload) and one._state()["seq"] == 2

    h2 = env.attempt(job, 2)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("not in the checkpoint")
    two = agent.Syncer(agent.Reporter(base, h2["Authorization"].split()[1], h2["X-Gpuhop-Attempt"], None), str(dst))
    assert await asyncio.to_thread(two.restore)
    assert (dst / "ckpt.json").read_text() == '{"step": 8}'
    assert (dst / "sub" / "model.bin").read_bytes() == b"\x00" * 300_000
    assert not (dst / "stale.txt").exists() and not (dst / ".gpuhop" / "secret-marker").exists()
    assert two._state()["seq"] == 2
    assert await asyncio.to_thread(two.upload) and two._state()["seq"] == 2  # restored = committed: no new one


async def test_volume_rm_deletes_its_checkpoints_so_a_new_job_starts_fresh(env: Env) -> None:
    job = env.job("gone-vol")
    h = env.attempt(job, 1)
    _, up = await env.post("upload", h, {"blobs": [{"sha256": SHA_A, "size": 1}]})
    env.put(up["upload"][0]["url"], b"a")
    assert (await env.post("commit", h, {"files": [entry("a", b"a")]}))[0] == 200
    env.store.update_attempt(env.store.attempts(job)[0].id or 0, status=AttemptStatus.ENDED.value)
    env.store.update_job(job, status="cancelled")
    resp = await env.client.delete("/v1/volumes/gone-vol", headers=H)
    assert resp.status == 200, await resp.text()
    assert env.s3 is not None
    assert env.s3.client().list_objects_v2(Bucket=BUCKET, Prefix="u/volumes/gone-vol/")["KeyCount"] == 0


async def test_a_commit_records_the_checkpoints_size_on_its_volume(env: Env) -> None:
    """A move is priced at the checkpoint it restores (orchestrator/moving.py), not at the volume's
    provisioned size: every commit writes the manifest's total size on the volume's row."""
    job = env.job("sized")
    env.store.set_volume_location("sized", "runpod", "EU-RO-1", "vol-sized", VolumeSpec(name="sized"))
    assert env.store.volume("sized").checkpoint_gb is None  # type: ignore[union-attr]
    h = env.attempt(job, 1)
    data = {"model.bin": b"\x01" * 3_000_000, "steps.log": b"1\n2\n"}
    files = [entry(path, body) for path, body in data.items()]
    _, up = await env.post("upload", h, {"blobs": [{"sha256": f["sha256"], "size": f["size"]} for f in files]})
    by_sha = {hashlib.sha256(b).hexdigest(): b for b in data.values()}
    for item in up["upload"]:
        env.put(item["url"], by_sha[item["sha256"]])
    assert (await env.post("commit", h, {"files": files}))[0] == 200
    vol = env.store.volume("sized")
    assert vol is not None and vol.checkpoint_gb == pytest.approx(3_000_004 / 1024**3)
    # a smaller checkpoint later: the size follows the latest one, not the largest
    assert (await env.post("commit", h, {"files": files[1:]}))[0] == 200
    assert env.store.volume("sized").checkpoint_gb == pytest.approx(4 / 1024**3)  # type: ignore[union-attr]
