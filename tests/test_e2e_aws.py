"""End to end on AWS (the moto-based simulator, as its own process) with a real daemon: on the
2-minute spot warning the replacement is launched before the old instance is reclaimed, the
EBS volume follows, and the job resumes from its checkpoint; with the volume's zone out of
capacity the job waits there; without a volume it moves to the cheapest other offer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.daemon_harness import (
    TRAIN,
    Daemon,
    SimProcess,
    assert_launches,
    launched,
    steps_done,
    wait_for,
)
from tests.daemon_harness import sim_volume_dir as volume_dir

pytestmark = pytest.mark.e2e
NOTICE = 8.0


def config(sim: SimProcess, local: bool = False) -> str:
    text = f"""
[engine]
tick_seconds = 0.5
launch_grace_seconds = 15
heartbeat_seconds = 1
heartbeat_timeout_seconds = 60
offer_refresh_seconds = 1
retry_backoff_max_seconds = 2
provider_timeout_seconds = 20
[providers.aws]
regions = ["us-east-1"]
endpoint_url = "{sim.url}"
access_key_id = "testing"
secret_access_key = "testing"
"""
    if local:
        text += '[providers.local]\ngpu_model = "A10G"\ngpu_slots = 1\ncpu_slots = 0\nprice_per_gpu_hour = 0.43\n'
    return text


def _env(tmp_path: Path, local: bool) -> Iterator[tuple[SimProcess, Daemon]]:
    sim = SimProcess("aws", tmp_path / "sim", "--notice-seconds", str(NOTICE))
    # as organisations run AWS: RunInstances denied unless IMDSv2 is required (the agent then
    # reads the spot notice with a session token)
    sim.admin("POST", "/_sim/policy", {"require_imdsv2": True})
    daemon = Daemon(tmp_path / "state", config(sim, local))
    try:
        daemon.start()
        yield sim, daemon
        owned = {a["instance_id"] for j in daemon.client.jobs() for a in daemon.client.job(j["id"])["attempts"]}
        instances = sim.admin("GET", "/_sim/instances")["instances"]
        assert {i["instance_id"] for i in instances} <= owned, "an instance no attempt knows about"
        volumes = {j["volume"]["volume_id"] for j in (daemon.client.job(x["id"]) for x in daemon.client.jobs())
                   if j.get("volume")}
        billed = {e["id"] for e in sim.admin("GET", "/_sim/ledger")["entries"] if e["kind"] == "volume"}
        assert billed <= volumes, "a volume the daemon does not own"
        wait_for(lambda: all(i["state"] in ("terminated", "shutting-down")
                             for i in sim.admin("GET", "/_sim/instances")["instances"]), 60,
                 what="every instance terminated")
    finally:
        daemon.stop()
        sim.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[SimProcess, Daemon]]:
    yield from _env(tmp_path, local=False)


@pytest.fixture
def env_local(tmp_path: Path) -> Iterator[tuple[SimProcess, Daemon]]:
    yield from _env(tmp_path, local=True)


def spec(name: str, steps: int, volume: str | None = None, capacity: str = "spot") -> dict:
    s: dict = {
        "name": name,
        "command": ["python3", str(TRAIN), "--steps", str(steps), "--step-seconds", "0.2"],
        "resources": {"gpu": ["A10G"], "gpu_count": 1},
        "placement": {"capacity": capacity},
        "policy": {"checkpoint_interval": 1, "max_relaunches": 5},
    }
    if volume:
        s["volume"] = {"name": volume, "size_gb": 10, "mount_path": "/workspace"}
    return s


def test_warning_launches_the_replacement_before_the_reclaim(env: tuple[SimProcess, Daemon]) -> None:
    sim, d = env
    job = d.client.submit(spec("aws-resume", 40, volume="aws-ckpt"))
    running = d.wait_status(job["id"], {"running"}, 60)
    wait_for(lambda: len(steps_done(volume_dir(sim, d.client.job(job["id"])))) >= 5, 60, what="5 steps")
    old = running["attempts"][0]
    notice = sim.admin("POST", f"/_sim/instances/{old['instance_id']}/interrupt")["notice"]
    reclaim_at = datetime.fromisoformat(notice["time"])
    # the replacement is launched while the old instance still runs: compare the times the
    # daemon and the provider recorded (this host's clock for both), not how long we waited
    second = wait_for(lambda: next((a for a in launched(d.client.job(job["id"])) if a["number"] == 2), None),
                      90, interval=0.1, what="the replacement launched")
    assert datetime.fromisoformat(second["launched_at"]) < reclaim_at, (second, notice)

    done = d.wait_status(job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded", done
    first, second = done["attempts"][0], done["attempts"][-1]
    assert first["end_reason"] == "preempted" and first["interruption_at"] is not None
    assert second["region"] == first["region"] == done["volume"]["region"]  # the EBS volume's zone
    assert second["volume_id"] == first["volume_id"]
    assert sorted(steps_done(volume_dir(sim, done))) == list(range(1, 41)), "each step exactly once"
    kinds = [(e["kind"], e["attempt"]) for e in done["events"]]
    # in the daemon's own order: the warning, the replacement launched while attempt 1 still
    # lived (not after its end, as a job that merely checkpointed on SIGTERM would get), its end
    assert kinds.index(("interruption", 1)) < kinds.index(("launched", 2)) < kinds.index(("preempted", 1)), kinds


def test_zone_out_of_capacity_waits_with_its_volume(env: tuple[SimProcess, Daemon]) -> None:
    sim, d = env
    job = d.client.submit(spec("aws-wait", 30, volume="aws-wait-ckpt"))
    running = d.wait_status(job["id"], {"running"}, 60)
    zone = running["attempts"][0]["region"]
    sim.admin("POST", "/_sim/capacity", {"zone": zone, "count": 0})
    sim.admin("POST", f"/_sim/instances/{running['attempts'][0]['instance_id']}/interrupt",
              {"notice_seconds": 1})
    d.wait_status(job["id"], {"recovering"}, 60)

    def three_tries_in_place() -> dict | None:
        # every look, while it tries again and again: launched only in its zone, and a launch
        # in flight (at most one) aimed there too
        job_now = d.client.job(job["id"])
        assert job_now["status"] == "recovering", job_now
        assert_launches(job_now, [zone])
        tries = [1 + e["repeats"] for e in job_now["events"] if e["kind"] == "no_capacity"]
        return job_now if sum(tries) >= 3 and "waiting for capacity" in job_now["message"] else None

    waiting = wait_for(three_tries_in_place, 60, interval=0.1, what="three placement tries")
    assert "waiting for capacity" in waiting["message"]
    sim.admin("POST", "/_sim/capacity", {"zone": zone, "count": 4})
    done = d.wait_status(job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded"
    assert {a["region"] for a in done["attempts"]} == {zone}
    assert sorted(steps_done(volume_dir(sim, done))) == list(range(1, 31))


def test_without_a_volume_the_job_moves_to_the_cheapest_other_offer(env_local: tuple[SimProcess, Daemon]) -> None:
    sim, d = env_local
    job = d.client.submit(spec("aws-move", 20, capacity="auto"))
    running = d.wait_status(job["id"], {"running"}, 60)
    first = running["attempts"][0]
    assert (first["provider"], first["region"], first["capacity"]) == ("aws", "us-east-1a", "spot")  # $0.41/h
    sim.admin("POST", "/_sim/capacity", {"zone": "us-east-1a", "count": 0})
    sim.admin("POST", f"/_sim/instances/{first['instance_id']}/interrupt", {"notice_seconds": 2})
    done = d.wait_status(job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded"
    # us-east-1a is gone; the local A10G at $0.43/h beats us-east-1b spot at $0.45/h
    assert done["attempts"][-1]["provider"] == "local", done["attempts"]
    assert done["attempts"][0]["end_reason"] == "preempted"
