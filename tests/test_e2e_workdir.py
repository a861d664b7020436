"""End to end with a job's working directory: `gpuhop submit` (the real CLI) uploads the job file's
directory to a real daemon, and on the RunPod simulator the agent fetches it before each attempt
and runs the job's script from a fresh copy, again after the pod is preempted; on the local
provider an archive the daemon accepts but whose links climb out once unpacked is refused by the
agent, and the job's command never runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import workdir
from tests.daemon_harness import REPO, Daemon, SimProcess, steps_done, wait_for
from tests.daemon_harness import sim_volume_dir as volume_dir
from tests.test_e2e_aws import config as aws_config
from tests.test_e2e_runpod import KEY
from tests.test_e2e_runpod import config as runpod_config
from tests.test_workdir import UNSAFE

pytestmark = pytest.mark.e2e

RUN_PY = """import os, sys
sys.path.insert(0, "lib")
import helper  # from the uploaded directory, not from the machine
print("workdir:", helper.NAME, "ignored file present:", os.path.exists("secret.txt"), flush=True)
sys.argv = ["train.py", "--steps", "12", "--step-seconds", "0.2"]
import train
sys.exit(train.main())
"""

JOB_TOML = """name = "wd-train"
workdir = "."
command = ["python3", "run.py"]
[resources]
gpu = ["RTX-4090"]
[placement]
providers = ["runpod"]
capacity = "on-demand"
[volume]
name = "wd-ckpt"
size_gb = 10
[policy]
checkpoint_interval = 1
max_relaunches = 5
"""


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GPUHOP_")}, "GPUHOP_STATE_DIR": str(d.state_dir)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=REPO)


def project(tmp_path: Path, job_toml: str = JOB_TOML) -> Path:
    """A job's directory: its job file, a script that imports a helper from a subdirectory, the
    example training loop, and a file .gpuhopignore keeps off the upload."""
    job_dir = tmp_path / "project"
    (job_dir / "lib").mkdir(parents=True)
    (job_dir / "job.toml").write_text(job_toml)
    (job_dir / "run.py").write_text(RUN_PY)
    (job_dir / "train.py").write_bytes((REPO / "examples" / "train.py").read_bytes())
    (job_dir / "lib" / "helper.py").write_text("NAME = 'helper-from-workdir'\n")
    (job_dir / "secret.txt").write_text("never uploaded")
    (job_dir / ".gpuhopignore").write_text("secret.txt\n")
    return job_dir


def test_runpod_job_runs_from_its_workdir_on_every_attempt(tmp_path: Path) -> None:
    job_dir = project(tmp_path)

    sim = SimProcess("runpod", tmp_path / "sim", "--api-key", KEY, "--notice-seconds", "1", "--start-delay", "0.3")
    d = Daemon(tmp_path / "state", runpod_config(sim))
    try:
        d.start()
        missing = cli(d, "submit", str(job_dir / "job.toml"), "--workdir", str(tmp_path / "nowhere"))
        assert missing.returncode != 0 and "does not exist" in missing.stderr
        assert d.client.jobs() == []  # nothing was submitted

        r = cli(d, "submit", str(job_dir / "job.toml"))  # from another directory: workdir is the file's
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        running = d.wait_status(job_id, {"running"}, 60)
        wait_for(lambda: len(steps_done(volume_dir(sim, d.client.job(job_id)))) >= 3, 60, what="3 steps")
        sim.admin("POST", f"/_sim/pods/{running['attempts'][0]['instance_id']}/preempt")

        done = d.wait_status(job_id, {"succeeded", "failed"}, 90)
        assert done["status"] == "succeeded", done
        assert [a["end_reason"] for a in done["attempts"]] == ["preempted", "succeeded"]
        assert sorted(steps_done(volume_dir(sim, done))) == list(range(1, 13))
        out = b"".join(d.client.logs(job_id)).decode()
        assert out.count("workdir: helper-from-workdir ignored file present: False") == 2, out
        assert "attempt 2: starting at step" in out
    finally:
        d.stop()
        sim.stop()


def test_aws_job_runs_from_its_workdir(tmp_path: Path) -> None:
    job_dir = project(tmp_path, JOB_TOML.replace('"RTX-4090"', '"A10G"').replace('"runpod"', '"aws"')
                      .replace('"on-demand"', '"spot"').replace('"12"', '"4"'))
    (job_dir / "run.py").write_text(RUN_PY.replace('"12"', '"4"'))
    sim = SimProcess("aws", tmp_path / "sim", "--notice-seconds", "8")
    d = Daemon(tmp_path / "state", aws_config(sim))
    try:
        d.start()
        r = cli(d, "submit", str(job_dir / "job.toml"))
        assert r.returncode == 0, r.stderr
        done = d.wait_status(r.stdout.strip(), {"succeeded", "failed"}, 90)
        assert done["status"] == "succeeded" and done["attempts"][0]["provider"] == "aws", done
        out = b"".join(d.client.logs(done["id"])).decode()
        assert "workdir: helper-from-workdir ignored file present: False" in out, out
        assert sorted(steps_done(volume_dir(sim, done))) == [1, 2, 3, 4]
    finally:
        d.stop()
        sim.stop()


def test_an_archive_whose_links_climb_out_is_refused_by_the_agent(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state", "[engine]\ntick_seconds = 0.5\n[providers.local]\ncpu_slots = 2\n")
    marker = tmp_path / "ran"
    try:
        d.start()
        data = UNSAFE["symlink_chain"]  # each link stays inside on its own: the daemon's check passes it
        sha = workdir.sha256(data)
        d.client.put_bytes(f"/v1/workdirs/{sha}", data, "application/gzip")
        job = d.client.submit({"name": "bad-wd", "command": ["touch", str(marker)], "resources": {"gpu_count": 0},
                               "workdir_sha256": sha})
        done = d.wait_status(job["id"], {"succeeded", "failed"}, 60)
        assert done["status"] == "failed", done
        assert done["attempts"][0]["exit_code"] == 127
        out = b"".join(d.client.logs(job["id"])).decode()
        assert "points outside the working directory" in out, out
        assert not marker.exists()
    finally:
        d.stop()
