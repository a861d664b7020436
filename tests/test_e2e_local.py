"""End to end on the local provider, with a real `gpuhop serve` process: a job killed out from
under gpuhop is relaunched and resumes from its checkpoint; kill -9 of the daemon loses and
duplicates nothing; failures, cancels and bad input behave as promised."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.client import ClientError
from tests.daemon_harness import Daemon, pids_alive, steps_done, train_spec, wait_for

pytestmark = pytest.mark.e2e

CONFIG = """
[engine]
tick_seconds = 0.5
launch_grace_seconds = 5
stop_grace_seconds = 2
[providers.local]
cpu_slots = 4
# the jobs here run the test's own python, which may sit under a 0700 home: run them as the
# daemon's user (tests/test_security.py runs local jobs isolated)
isolation = "none"
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "state", CONFIG)
    d.start()
    yield d
    d.stop()
    # no process of any local instance may outlive the test
    pids = [int(p.read_text()) for p in (tmp_path / "state" / "local" / "instances").glob("*/*.pid")]
    assert wait_for(lambda: not pids_alive(pids), 15, what="every job process gone") is True


def volume_dir(d: Daemon, name: str) -> Path:
    """Local volumes live next to the state dir, not in it (jobs must not reach the state)."""
    return d.state_dir.with_name(f"{d.state_dir.name}-volumes") / name


def instance_dir(d: Daemon, job_id: str, attempt: int) -> Path:
    return d.state_dir / "local" / "instances" / f"gpuhop-{job_id}-{attempt}"


def test_killed_job_is_relaunched_and_resumes_from_checkpoint(daemon: Daemon) -> None:
    job = daemon.client.submit(train_spec("resume", steps=25, step_seconds=0.2, volume="resume-ckpt"))
    volume = volume_dir(daemon, "resume-ckpt")
    wait_for(lambda: len(steps_done(volume)) >= 5, 30, what="5 steps done")
    job_pid = int((instance_dir(daemon, job["id"], 1) / "job.pid").read_text())
    os.killpg(job_pid, signal.SIGKILL)  # the machine "dies" under the job

    done = daemon.wait_status(job["id"], {"succeeded", "failed"}, 60)
    assert done["status"] == "succeeded", done
    first, second = done["attempts"][0], done["attempts"][1]
    assert (first["status"], first["end_reason"]) == ("ended", "lost")
    assert "signal 9" in first["detail"]
    assert second["end_reason"] == "succeeded" and len(done["attempts"]) == 2
    steps = steps_done(volume)
    assert sorted(steps) == list(range(1, 26)), "each step exactly once"
    assert collections.Counter(steps).most_common(1)[0][1] == 1
    out = b"".join(daemon.client.logs(job["id"])).decode()
    assert "attempt 2: starting at step" in out and "starting at step 0" in out
    assert done["cost_usd"] == 0.0  # the local machine is free unless priced in the config


def test_kill9_daemon_while_jobs_run_loses_and_duplicates_nothing(daemon: Daemon) -> None:
    jobs = [daemon.client.submit(train_spec(f"crash{i}", steps=15, step_seconds=0.2, volume=f"crash{i}"))
            for i in range(3)]
    for j in jobs:
        daemon.wait_status(j["id"], {"running"}, 30)
    daemon.kill9()
    daemon.start()  # a new daemon process, same state dir
    for j in jobs:
        done = daemon.wait_status(j["id"], {"succeeded", "failed", "cancelled"}, 60)
        assert done["status"] == "succeeded", done
        assert len(done["attempts"]) == 1, "the restarted daemon found the job instead of launching it again"
        steps = steps_done(volume_dir(daemon, done["spec"]["volume"]["name"]))
        assert sorted(steps) == list(range(1, 16))


def test_nonzero_exit_fails_with_the_code(daemon: Daemon) -> None:
    job = daemon.client.submit({"name": "boom", "command": [sys.executable, "-c", "import sys; sys.exit(7)"],
                                "resources": {"gpu_count": 0}})
    done = daemon.wait_status(job["id"], {"succeeded", "failed"}, 30)
    assert done["status"] == "failed"
    assert "exit code 7" in done["end_reason"]
    assert done["attempts"][0]["exit_code"] == 7 and done["attempts"][0]["end_reason"] == "failed"


def test_nonzero_exit_is_retried_when_allowed(daemon: Daemon) -> None:
    job = daemon.client.submit({"name": "flaky", "command": [sys.executable, "-c", "import sys; sys.exit(3)"],
                                "resources": {"gpu_count": 0}, "policy": {"max_retries_on_error": 2}})
    done = daemon.wait_status(job["id"], {"succeeded", "failed"}, 30)
    assert done["status"] == "failed" and len(done["attempts"]) == 3 and done["retries"] == 3


def test_cancel_stops_the_job_within_seconds(daemon: Daemon) -> None:
    job = daemon.client.submit(train_spec("long", steps=1000, step_seconds=0.2))
    daemon.wait_status(job["id"], {"running"}, 30)
    inst = instance_dir(daemon, job["id"], 1)
    pids = [int((inst / "job.pid").read_text()), int((inst / "agent.pid").read_text())]
    daemon.client.cancel(job["id"])
    done = daemon.wait_status(job["id"], {"cancelled"}, 15)
    assert done["end_reason"] == "cancelled by the user"
    assert done["attempts"][0]["end_reason"] == "cancelled"
    wait_for(lambda: not pids_alive(pids), 10, what="job processes gone")


def test_bad_input_is_refused_and_changes_nothing(daemon: Daemon) -> None:
    c = daemon.client
    before = c.jobs()
    bad_specs = [
        {"name": "x"},  # no command
        {"name": "x", "command": ["true"], "surprise": 1},  # unknown field
        {"name": "x", "command": ["true"], "resources": {"gpu_count": -1}},  # negative
        {"name": "x", "command": ["true"], "resources": {"disk_gb": "lots"}},  # wrong type
        {"name": "x", "command": ["true"], "placement": {"max_price_per_hour": 1e12}},  # absurd price
        {"name": "x; rm -rf /", "command": ["true"]},  # hostile name
        {"name": "x", "command": ["true"], "env": {"A": "ok\x00no"}},  # NUL in env
        {"name": "x", "command": ["true"], "env": {"GPUHOP_TOKEN": "steal"}},  # reserved env
        {"name": "x", "command": ["true"], "resources": {"gpu": ["NotAGpu9000"]}},  # unknown GPU
        {"name": "x", "command": ["true"], "placement": {"providers": ["nimbus"]}},  # unknown provider
        ["not", "an", "object"],
    ]
    for spec in bad_specs:
        with pytest.raises(ClientError) as err:
            c.submit(spec)  # type: ignore[arg-type]
        assert 400 <= err.value.status < 500, (spec, err.value)
        assert str(err.value)
    # malformed JSON, straight over the wire
    import urllib.request

    req = urllib.request.Request(c.url + "/v1/jobs", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {c.token}"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=10)
    assert http_err.value.code == 400
    assert "not valid JSON" in json.loads(http_err.value.read())["error"]["message"]
    assert c.jobs() == before
    # hostile but legal env values arrive unchanged
    hostile = "quote\" back\\slash\nnewline $(reboot) `id` ' ; | & é€"
    job = c.submit({"name": "env-ok", "resources": {"gpu_count": 0}, "env": {"HOSTILE": hostile},
                    "command": [sys.executable, "-c", "import os; print(repr(os.environ['HOSTILE']))"]})
    daemon.wait_status(job["id"], {"succeeded"}, 30)
    assert repr(hostile) in b"".join(c.logs(job["id"])).decode()


def test_cli_reports_bad_spec_files_clearly(daemon: Daemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ncommand = ["true"]\n[resources]\ngpu_count = -2\n')
    env = {**os.environ, "GPUHOP_STATE_DIR": str(daemon.state_dir)}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(bad)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert "resources.gpu_count" in r.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(broken)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode != 0 and "not valid TOML" in r.stderr
    assert daemon.client.jobs() == []
    good = tmp_path / "good.toml"
    good.write_text(f'name = "cli-ok"\ncommand = ["{sys.executable}", "-c", "print(42)"]\n[resources]\ngpu_count = 0\n')
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(good)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    daemon.wait_status(job_id, {"succeeded"}, 30)
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "show", job_id, "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    shown = json.loads(r.stdout)
    assert {"id", "status", "cost_usd", "end_reason", "attempts"} <= set(shown)
    assert {"number", "provider", "instance_id", "status", "end_reason", "cost_usd"} <= set(shown["attempts"][0])
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "jobs"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert job_id in r.stdout and "succeeded" in r.stdout
    # the dashboard's login link carries the token in the #fragment, and the page answers there
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "dashboard"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    link = next(line for line in r.stdout.splitlines() if "#token=" in line).split("log in with: ")[1]
    assert link == f"{daemon.client.url}/#token={daemon.client.token}"
    with urllib.request.urlopen(link.split("#")[0], timeout=30) as page:
        assert b"/ui/app.js" in page.read()
    # volumes: none yet as a table, and as JSON
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "volumes", "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout) == {"volumes": [], "retired": [], "storage_usd_per_month": 0.0}, r.stderr


def test_budget_stops_the_job_and_says_so(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state", CONFIG.replace("cpu_slots = 4", "cpu_slots = 1\ncpu_slot_price_per_hour = 1000"))
    d.start()
    try:
        # $1000 an hour, at most $1: the job is stopped after about 3.6 seconds
        job = d.client.submit(train_spec("pricey", steps=1000, step_seconds=0.2,
                                         policy={"max_cost_usd": 1, "max_relaunches": 5}))
        done = d.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, 60)
        assert done["status"] == "failed" and done["end_reason"].startswith("budget: spent $")
        assert [a["end_reason"] for a in done["attempts"]] == ["budget"]
        assert 1.0 <= done["cost_usd"] < 2.0
        env = {**os.environ, "GPUHOP_STATE_DIR": str(d.state_dir)}
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "watch", job["id"]], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0 and "budget" in r.stdout  # watch ends by itself once the job has ended
    finally:
        d.stop()
