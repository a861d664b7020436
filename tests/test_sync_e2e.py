"""End to end, checkpoint sync through object storage (issue 11.1): a real daemon, the RunPod
simulator and the S3 simulator (SigV4 checked), each its own process. A job whose volume syncs
checkpoints into the bucket (every 0.3 s, or only in its final sync after a reclaim notice); its pod is taken away and the volume's data is gone with it (as when
the relaunch lands in another data center); the relaunch restores the newest complete checkpoint
before the job starts and every step is done exactly once. Neither the agent nor the job ever
holds the storage secret."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.daemon_harness import TRAIN, Daemon, SimProcess, steps_done, wait_for
from tests.daemon_harness import sim_volume_dir as volume_dir
from tests.test_e2e_runpod import KEY
from tests.test_e2e_runpod import config as runpod_config

pytestmark = pytest.mark.e2e
ACCESS_KEY = "AKIAGPUHOPSYNCTEST01"
SECRET = "s3cr3t-Sync-Test-0123456789abcdefghijkl"
BUCKET = "gpuhop-ckpt"


def s3_client(s3: SimProcess) -> Any:
    return boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET, config=Config(signature_version="s3v4"))


def manifests(s3: SimProcess, volume: str) -> list[str]:
    page = s3_client(s3).list_objects_v2(Bucket=BUCKET, Prefix=f"t/volumes/{volume}/manifests/")
    return [o["Key"] for o in page.get("Contents", [])]


@contextlib.contextmanager
def synced_runpod(root: Path, notice_seconds: float, more_toml: str) -> Iterator[tuple[SimProcess, SimProcess, Daemon]]:
    """The S3 and RunPod simulators and a daemon whose volumes sync to the bucket (`more_toml`:
    the rest of [storage], and [moving]). Afterwards: the bucket's secret and RunPod's key are
    in neither the daemon's log nor any job's API answer."""
    s3 = SimProcess("s3", root / "s3", "--access-key-id", ACCESS_KEY, "--secret-access-key", SECRET,
                    "--bucket", BUCKET, ready_path="/_sim/health")
    sim = SimProcess("runpod", root / "sim", "--api-key", KEY, "--notice-seconds", f"{notice_seconds:g}",
                     "--start-delay", "0.3")
    daemon = Daemon(root / "state", runpod_config(sim) + f"""
[storage]
endpoint_url = "{s3.url}"
bucket = "{BUCKET}"
prefix = "t"
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET}"
{more_toml}""")
    try:
        daemon.start()
        yield s3, sim, daemon
        log = daemon.log_path.read_text()
        assert SECRET not in log and KEY not in log
        for j in daemon.client.jobs():
            answer = json.dumps(daemon.client.job(j["id"]))
            assert SECRET not in answer and KEY not in answer
    finally:
        daemon.stop()
        sim.stop()
        s3.stop()


@pytest.fixture(params=[0.3, 60.0], ids=["periodic", "final-sync-only"])
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[SimProcess, SimProcess, Daemon]]:
    with synced_runpod(tmp_path, 3, f"""presign_ttl_seconds = 60
sync_interval_seconds = {request.param}
[moving]
# this test restores in the same data center, its volume wiped; with moving on, the emptied data
# center and a checkpoint of a few KB make moving cheaper than waiting (tests/test_move_e2e.py)
enabled = false
""") as three:
        yield three


def _environ_of_attempt(name: str) -> list[bytes]:
    """The environment and argv of every process of the attempt (the agent and its job)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            if f"GPUHOP_ATTEMPT_NAME={name}".encode() in environ.split(b"\0") or (
                    f"GPUHOP_JOB_ID={name.split('-')[1]}".encode() in environ.split(b"\0")):
                found.append(environ + Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            continue
    return found


def test_relaunch_restores_the_newest_complete_checkpoint(env: tuple[SimProcess, SimProcess, Daemon]) -> None:
    s3, sim, d = env
    spec = {
        "name": "sync-resume", "image": "python:3.11-slim",
        "command": ["python3", str(TRAIN), "--steps", "20", "--step-seconds", "0.2"],
        "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
        "placement": {"providers": ["runpod"], "capacity": "on-demand"},
        "policy": {"checkpoint_interval": 1, "max_relaunches": 5},
        "volume": {"name": "sync-ckpt", "size_gb": 10, "sync": "object-store"},
    }
    job = d.client.submit(spec)
    running = d.wait_status(job["id"], {"running"}, 60)
    first = running["attempts"][0]
    vol = volume_dir(sim, running)
    periodic = "sync_interval_seconds = 0.3" in d.config_path.read_text()
    # periodic: checkpoints reach the bucket while the job runs; final-sync-only (60 s interval):
    # nothing does until the notice, when the agent uploads once the job has saved and exited
    wait_for(lambda: len(steps_done(vol)) >= 6 and (manifests(s3, "sync-ckpt") or not periodic), 60,
             what="6 steps, synced")

    # (b) the agent and its job hold no storage secret, in environment or argv
    procs = _environ_of_attempt(first["name"])
    assert procs, "the attempt's processes were not found"
    for blob in procs:
        assert SECRET.encode() not in blob and ACCESS_KEY.encode() not in blob
        assert b"GPUHOP_SYNC_SECONDS" not in blob or b"GPUHOP_ATTEMPT_NAME" in blob, "the job saw agent settings"

    # the pod is taken away and its data with it: the relaunch must come from the bucket
    dc = first["region"]
    sim.admin("POST", "/_sim/capacity", {"count": 0, "data_center": dc})
    sim.admin("POST", f"/_sim/pods/{first['instance_id']}/preempt")
    wait_for(lambda: d.client.job(job["id"])["attempts"][0]["status"] == "ended", 30, what="first attempt ended")
    committed = max(manifests(s3, "sync-ckpt"))
    assert periodic or committed.endswith("/000000000001.json"), "the final sync on SIGTERM committed nothing"
    shutil.rmtree(vol)
    vol.mkdir()
    sim.admin("POST", "/_sim/capacity", {"count": 4, "data_center": dc})

    done = d.wait_status(job["id"], {"succeeded", "failed"}, 90)
    assert done["status"] == "succeeded", done
    assert done["attempts"][0]["end_reason"] == "preempted"
    assert sorted(steps_done(vol)) == list(range(1, 21)), "each step exactly once"
    out = b"".join(d.client.logs(job["id"])).decode()
    resumed = [line for line in out.splitlines() if line.startswith(f"attempt {done['attempts'][-1]['number']}: starting")]
    assert resumed and not resumed[0].endswith("at step 0 of 20"), out[-2000:]
    assert "gpuhop-agent: volume at checkpoint" in out
    assert max(manifests(s3, "sync-ckpt")) > committed  # the relaunch goes on checkpointing

    # (b) every URL the agent used names the key id only in X-Amz-Credential, never the secret
    requests = s3.admin("GET", "/_sim/requests")["requests"]
    presigned = [r for r in requests if "X-Amz-Signature=" in r["uri"]]
    assert {r["method"] for r in presigned} >= {"GET", "PUT"}
    for r in presigned:
        assert SECRET not in json.dumps(r)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(r["uri"]).query)
        assert query["X-Amz-Credential"][0].startswith(ACCESS_KEY + "/")
        assert ACCESS_KEY not in r["uri"].replace(urllib.parse.quote(query["X-Amz-Credential"][0], safe=""), "")
        assert r["refused"] is None, r
