"""Three real `gpuhop serve` replicas on one PostgreSQL database with the RunPod simulator
(issue 9.6): jobs submitted through any replica run; when one replica is killed with kill -9, its
jobs are taken over by the others once its lease expires, their agents report to a live replica,
a preemption of a taken-over job is recovered by its new owner, and nothing is done twice: one
machine per attempt name, one attempt per job that was not preempted, every step once."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import pg_schema
from tests.daemon_harness import TRAIN, Daemon, SimProcess, steps_done, wait_for
from tests.daemon_harness import sim_volume_dir as volume_dir

pytestmark = pytest.mark.e2e
KEY = "rpa_REPLICAS0123456789ABCDEF"
TTL = 3.0
STEPS = 30


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_schema("r") as url:
        yield url


def config(sim: SimProcess, url: str) -> str:
    return f"""
[database]
url = "{url}"
[cluster]
lease_ttl_seconds = {TTL}
claim_interval_seconds = 0.5
[engine]
tick_seconds = 0.5
launch_grace_seconds = 10
heartbeat_seconds = 0.5
# short: an agent that could not reach a live replica would have its job called lost and
# relaunched, which the test counts
heartbeat_timeout_seconds = 6
offer_refresh_seconds = 1
retry_backoff_max_seconds = 2
[providers.runpod]
api_key = "{KEY}"
api_url = "{sim.url}"
request_timeout_seconds = 3
# offers a second old at most (the default 30 s): a relaunch sees the simulator's capacity as
# it is, and the test's run time does not depend on where a 30 s cache stands
offer_ttl_seconds = 1
"""


def spec(name: str) -> dict:
    return {
        "name": name, "image": "python:3.11-slim",
        "command": ["python3", str(TRAIN), "--steps", str(STEPS), "--step-seconds", "0.3"],
        "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
        "placement": {"providers": ["runpod"], "capacity": "on-demand"},
        "policy": {"checkpoint_interval": 1, "max_relaunches": 5},
        "volume": {"name": f"{name}-ckpt", "size_gb": 10, "mount_path": "/workspace"},
    }


def owners(url: str) -> dict[str, str | None]:
    store = Store(url)
    try:
        return {j.id: j.lease_owner for j in store.list_jobs(limit=1000)}
    finally:
        store.close()


def test_a_killed_replicas_jobs_are_taken_over_and_nothing_runs_twice(tmp_path: Path, pg_url: str) -> None:
    sim = SimProcess("runpod", tmp_path / "sim", "--api-key", KEY, "--notice-seconds", "1", "--start-delay", "0.3")
    replicas = [Daemon(tmp_path / f"state-{n}", config(sim, pg_url)) for n in range(3)]
    try:
        for d in replicas:
            d.start()
        wait_for(lambda: all(len(d.client.status()["peers"]) == 2 for d in replicas), 30, what="replicas see each other")
        assert replicas[0].client.status()["replica"] != replicas[1].client.status()["replica"]
        submitted = {n: [d.client.submit(spec(f"r{n}-{k}"))["id"] for k in range(3)] for n, d in enumerate(replicas)}
        every = [j for ids in submitted.values() for j in ids]
        live = replicas[1].client
        wait_for(lambda: all(live.job(j)["status"] == "running" for j in every), 90, what="every job running")
        wait_for(lambda: all(len(steps_done(volume_dir(sim, live.job(j)))) >= 3 for j in every), 60,
                 what="every job 3 steps in")
        dead_id = replicas[0].client.status()["replica"]
        before = owners(pg_url)
        assert {before[j] for j in submitted[0]} == {dead_id}  # a job is its submitting replica's
        replicas[0].kill9()
        killed_at = time.monotonic()
        # a preemption of one of the dead replica's jobs: the replica that takes it over recovers it
        preempted = submitted[0][0]
        pod = live.job(preempted)["attempts"][0]["instance_id"]
        sim.admin("POST", f"/_sim/pods/{pod}/preempt")

        wait_for(lambda: not {owners(pg_url)[j] for j in submitted[0]} & {dead_id}, 60, what="jobs taken over")
        adopted_after = time.monotonic() - killed_at
        done = {j: replicas[1 + every.index(j) % 2].wait_status(j, {"succeeded", "failed", "cancelled"}, 120)
                for j in every}
        assert {j: d["status"] for j, d in done.items()} == {j: "succeeded" for j in every}
        for j, d in done.items():
            assert sorted(steps_done(volume_dir(sim, d))) == list(range(1, STEPS + 1)), f"{j}: each step once"
            expected = 2 if j == preempted else 1  # healthy work is never relaunched
            assert len(d["attempts"]) == expected, (j, adopted_after, d["attempts"])
        assert done[preempted]["attempts"][0]["end_reason"] == "preempted"
        pods = sim.admin("GET", "/_sim/pods")["pods"]
        per_name = Counter(p["name"] for p in pods)
        assert per_name and max(per_name.values()) == 1, f"an attempt name carried by two machines: {per_name}"
        assert {o for j, o in owners(pg_url).items() if j in submitted[0]} <= {
            replicas[1].client.status()["replica"], replicas[2].client.status()["replica"]}
        wait_for(lambda: not [e for e in sim.admin("GET", "/_sim/ledger")["entries"]
                              if e["kind"] == "pod" and e["running"]], 30, what="no pod billing")
    finally:
        for d in replicas:
            d.stop()
        sim.stop()
