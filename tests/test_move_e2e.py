"""End to end, a job moving away from its volume (issue 11): a real daemon, the RunPod simulator
and the S3 simulator, each its own process. A RunPod job whose volume syncs to object storage
checkpoints its steps; its data center runs out of capacity and its pod is taken away. Waiting
there is priced dear (`[moving] prior_wait_seconds` of a day), so the daemon moves the job to
another data center: a new network volume there, the relaunch restores the last complete
checkpoint into it and resumes, each step runs exactly once, the attempt says why it moved and
what the transfer cost (API and `gpuhop show`), priced at the checkpoint's real size, and the
old data center's volume is deleted: one pod per attempt, one volume left, nothing billing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.render import money
from tests.daemon_harness import TRAIN, Daemon, SimProcess, steps_done, wait_for
from tests.daemon_harness import sim_volume_dir as volume_dir
from tests.test_sync_e2e import manifests, synced_runpod

pytestmark = pytest.mark.e2e
STEPS = 20
WEIGHTS_MB = 4  # a checkpoint big enough for its transfer to be priced above zero
EGRESS_USD_PER_GB = 1.0
# the job: a weights file written once into the volume, then the example training loop
JOB = (f"import os, runpy, sys; p = os.path.join(os.environ['GPUHOP_VOLUME'], 'weights.bin'); "
       f"os.path.exists(p) or open(p, 'wb').write(os.urandom({WEIGHTS_MB} << 20)); "
       f"sys.argv = [{str(TRAIN)!r}, '--steps', '{STEPS}', '--step-seconds', '0.2']; "
       f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[SimProcess, SimProcess, Daemon]]:
    with synced_runpod(tmp_path, 1, f"""sync_interval_seconds = 0.3
[moving]
# a capacity gap is expected to last a day: waiting costs ~$16 of the pinned $0.69/h, moving
# a few MB of checkpoint a fraction of a cent
prior_wait_seconds = 86400
egress_usd_per_gb = {EGRESS_USD_PER_GB}
""") as three:
        yield three


def test_a_job_moves_to_another_data_center_and_resumes_from_its_checkpoint(
        env: tuple[SimProcess, SimProcess, Daemon]) -> None:
    s3, sim, d = env
    spec = {
        "name": "move-resume", "image": "python:3.11-slim", "command": ["python3", "-c", JOB],
        "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
        "placement": {"providers": ["runpod"], "capacity": "on-demand"},
        "policy": {"checkpoint_interval": 1, "max_relaunches": 5},
        "volume": {"name": "move-ckpt", "size_gb": 10, "sync": "object-store"},
    }
    job = d.client.submit(spec)
    running = d.wait_status(job["id"], {"running"}, 60)
    first = running["attempts"][0]
    old_dc, old_volume = first["region"], running["volume"]["volume_id"]
    old_dir = volume_dir(sim, running)
    wait_for(lambda: len(steps_done(old_dir)) >= 6 and manifests(s3, "move-ckpt"), 60, what="6 steps, synced")
    weights = hashlib.sha256((old_dir / "weights.bin").read_bytes()).hexdigest()

    # the data center is emptied: no capacity there, and the pod's host goes away
    sim.admin("POST", "/_sim/capacity", {"count": 0, "data_center": old_dc})
    sim.admin("POST", f"/_sim/pods/{first['instance_id']}/preempt")

    # within seconds: the launch that finds the data center empty drops the adapter's cached
    # listing (test_runpod_adapter.py::test_no_capacity covers that with RunPod's default 30 s TTL)
    wait_for(lambda: [a for a in d.client.job(job["id"])["attempts"][1:] if a["instance_id"]], 15,
             what="the job launched elsewhere")
    done = d.wait_status(job["id"], {"succeeded", "failed"}, 60)
    assert done["status"] == "succeeded", done
    attempts = done["attempts"]
    assert [a["end_reason"] for a in attempts] == ["preempted", "succeeded"], attempts
    moved = attempts[1]
    assert moved["provider"] == "runpod" and moved["region"] != old_dc
    assert done["volume"]["region"] == moved["region"] and done["volume"]["volume_id"] == moved["volume_id"]
    assert moved["volume_id"] != old_volume
    # why it moved, and what the transfer cost: priced at the checkpoint's size (a few MB, recorded
    # by the commits), not at the volume's 10 GB (which would be $10 of egress)
    assert moved["placement_reason"].startswith(f"moved from runpod/{old_dc}, which has no capacity"), moved
    assert "expected wait" in moved["placement_reason"]
    assert 0 < moved["transfer_cost_usd"] < 0.05, moved
    assert attempts[0]["transfer_cost_usd"] is None
    assert any(e["kind"] == "volume_moved" for e in done["events"]), done["events"]

    # the relaunch restored the last complete checkpoint in the new data center and resumed there
    new_dir = volume_dir(sim, done)
    assert sorted(steps_done(new_dir)) == list(range(1, STEPS + 1)), "each step exactly once"
    assert hashlib.sha256((new_dir / "weights.bin").read_bytes()).hexdigest() == weights
    out = b"".join(d.client.logs(job["id"])).decode()
    resumed = [line for line in out.splitlines() if line.startswith("attempt 2: starting")]
    assert resumed and not resumed[0].endswith(f"at step 0 of {STEPS}"), out[-2000:]
    assert "gpuhop-agent: volume at checkpoint" in out

    # `gpuhop show` says so too
    show = subprocess.run([sys.executable, "-m", "orchestrator.cli", "show", job["id"]], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "GPUHOP_STATE_DIR": str(d.state_dir),
                                                      "COLUMNS": "400"})
    assert show.returncode == 0, show.stderr
    assert f"moved from runpod/{old_dc}" in show.stdout and money(moved["transfer_cost_usd"]) in show.stdout

    # at the provider: one pod per attempt, the old data center's volume deleted, nothing billing
    pods = sim.admin("GET", "/_sim/pods")["pods"]
    assert Counter(p["name"] for p in pods) == Counter(a["name"] for a in attempts), pods
    wait_for(lambda: [v["id"] for v in sim.admin("GET", "/_sim/pods")["volumes"]] == [moved["volume_id"]], 15,
             what="only the moved volume left")
    wait_for(lambda: not [e for e in sim.admin("GET", "/_sim/ledger")["entries"]
                          if e["kind"] == "pod" and e["running"]], 15, what="no pod billing")
