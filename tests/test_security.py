"""Local jobs cannot read the daemon's secrets or each other's volumes (issue 8 item 1).

A real daemon runs two real local jobs. The first keeps a secret in its volume; the second
tries to read the API token, `agent.key`, the database, the first job's secret (by absolute
path and by a path relative to its own `$GPUHOP_VOLUME`) and its agent's environment (which
holds the per-attempt token), and writes down what each attempt got. Under `isolation = "user"`
every attempt is refused; under `isolation = "none"` the same job reads them all, which proves
the test can fail. Running jobs as other users takes root (CI runs as root): skipped otherwise.

The pure parts (the choice of isolation, the container command line, the uid registry) and the
start-up warning are tested here too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import AdapterContext
from adapters.local import LocalAdapter, LocalSettings, UidRegistry, choose, container_argv
from adapters.local.isolation import detect_runtime
from orchestrator.models import CapacityType, InstanceState, LaunchRequest, Offer
from tests.daemon_harness import Daemon, wait_for

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="running jobs as other users needs root")

PROBE = r"""
import json, os, sys
targets = json.loads(sys.argv[1])
volume = os.environ["GPUHOP_VOLUME"]
targets["agent environ"] = f"/proc/{os.getppid()}/environ"
result = {"uid": os.getuid(), "env": sorted(k for k in os.environ if k.startswith("GPUHOP_"))}
for what, path in targets.items():
    path = path.replace("$GPUHOP_VOLUME", volume)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        result[what] = "read:" + data.decode("utf-8", "replace")[:4000]
    except OSError as exc:
        result[what] = "denied:" + type(exc).__name__
with open(os.path.join(volume, "probe.json"), "w") as fh:
    json.dump(result, fh)
"""

KEEPER = "import os; open(os.path.join(os.environ['GPUHOP_VOLUME'], 'secret.txt'), 'w').write('secret of a')"


def _python_for_any_user() -> str | None:
    """A python3 an unprivileged uid can run (the venv's may sit under a 0700 home)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if not os.path.exists(candidate):
            continue
        ok = subprocess.run([candidate, "-c", "pass"], user=65534, group=65534, extra_groups=[],
                            capture_output=True, timeout=60)
        if ok.returncode == 0:
            return candidate
    return None


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may walk through (pytest's tmp dirs are 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="gpuhop-sec-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(isolation: str) -> str:
    return f"""
[engine]
tick_seconds = 0.5
launch_grace_seconds = 5
stop_grace_seconds = 2
[providers.local]
cpu_slots = 2
isolation = "{isolation}"
"""


def _run_probe(base: Path, isolation: str, python: str) -> tuple[Daemon, dict[str, Any]]:
    state = base / "state"
    volumes = base / "state-volumes"  # the default: next to the state dir
    d = Daemon(state, _config(isolation))
    d.start()
    try:
        a = d.client.submit({"name": "keeper", "command": [python, "-c", KEEPER],
                             "resources": {"gpu_count": 0}, "volume": {"name": "vol-a", "size_gb": 1}})
        done = d.wait_status(a["id"], {"succeeded", "failed"}, 60)
        assert done["status"] == "succeeded", (done, d.log())
        targets = {
            "token": str(state / "token"),
            "agent.key": str(state / "agent.key"),
            "gpuhop.db": str(state / "gpuhop.db"),
            "other volume": str(volumes / "vol-a" / "secret.txt"),
            "other volume, relative": "$GPUHOP_VOLUME/../vol-a/secret.txt",
            "token, relative": "$GPUHOP_VOLUME/../../state/token",
        }
        b = d.client.submit({"name": "prober", "command": [python, "-c", PROBE, json.dumps(targets)],
                             "resources": {"gpu_count": 0}, "volume": {"name": "vol-b", "size_gb": 1}})
        done = d.wait_status(b["id"], {"succeeded", "failed"}, 60)
        assert done["status"] == "succeeded", (done, d.log())
        return d, json.loads((volumes / "vol-b" / "probe.json").read_text())
    finally:
        d.stop()


@ROOT_ONLY
def test_a_local_job_cannot_read_the_daemons_secrets_or_another_volume(base: Path) -> None:
    python = _python_for_any_user()
    if python is None:
        pytest.skip("no python3 on this machine that an unprivileged user may run")
    d, seen = _run_probe(base, "user", python)
    for what in ("token", "agent.key", "gpuhop.db", "other volume", "other volume, relative",
                 "token, relative", "agent environ"):
        assert seen[what].startswith("denied:"), (what, seen[what][:80])
    assert seen["env"] == ["GPUHOP_ATTEMPT", "GPUHOP_JOB_ID", "GPUHOP_LOCAL_INSTANCE", "GPUHOP_VOLUME"]
    low, high = LocalSettings().job_uid_range
    assert low <= seen["uid"] <= high
    volumes = base / "state-volumes"
    owners = {(volumes / v).stat().st_uid for v in ("vol-a", "vol-b")}
    assert len(owners) == 2 and seen["uid"] in owners, "each volume has a uid of its own"
    for v in ("vol-a", "vol-b"):
        assert stat.S_IMODE((volumes / v).stat().st_mode) == 0o700
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700
    assert "NOT isolated" not in d.log()


@ROOT_ONLY
def test_without_isolation_the_same_job_reads_them_all(base: Path) -> None:
    """The control: proves the probe above can see a leak when there is one."""
    python = _python_for_any_user() or "/usr/bin/python3"
    d, seen = _run_probe(base, "none", python)
    token = (d.state_dir / "token").read_text()
    assert seen["token"] == "read:" + token and seen["token, relative"] == "read:" + token
    assert seen["agent.key"] == "read:" + (d.state_dir / "agent.key").read_text()
    assert seen["gpuhop.db"].startswith("read:SQLite format 3")
    assert seen["other volume"] == seen["other volume, relative"] == "read:secret of a"
    assert "GPUHOP_TOKEN=" in seen["agent environ"]  # the agent's own environment: its token
    assert seen["env"] == ["GPUHOP_ATTEMPT", "GPUHOP_JOB_ID", "GPUHOP_LOCAL_INSTANCE", "GPUHOP_VOLUME"]
    assert "local jobs are NOT isolated" in d.log()


# --------------------------------------------------------------------------- the adapter


def _ctx(base: Path) -> AdapterContext:
    return AdapterContext(prefix="gpuhop", state_dir=base / "state", logs_dir=base / "state" / "logs",
                          public_url="http://127.0.0.1:1")


def _req(name: str, command: list[str], volume: Any = None) -> LaunchRequest:
    offer = Offer(provider="local", offer_id="cpu", region="local", gpu=None, gpu_count=0, vram_gb=0,
                  vcpu=1, memory_gb=1, disk_gb=0, capacity=CapacityType.ON_DEMAND, price_per_hour=0.0)
    return LaunchRequest(name=name, idempotency_key=name, job_id=name.split("-")[1], attempt=1, offer=offer,
                         image="python:3.11-slim", command=command, env={}, disk_gb=1, volume=volume)


@ROOT_ONLY
async def test_user_isolation_through_the_adapter_gives_each_attempt_its_own_uid_and_cleans_up(
    base: Path,
) -> None:
    python = _python_for_any_user()
    if python is None:
        pytest.skip("no python3 on this machine that an unprivileged user may run")
    a = LocalAdapter(LocalSettings(isolation="user", stop_grace_seconds=1), _ctx(base))
    code = "import os; open(os.path.join(os.environ['GPUHOP_VOLUME'], 'me'), 'w').write(str(os.getuid()))"
    vol = await a.ensure_volume("v1", 1, "local")
    vol_uid = a.uids.get("volume:v1")
    assert vol_uid is not None and a.volume_dir("v1").stat().st_uid == vol_uid
    await a.launch(_req("gpuhop-withvol-1", [python, "-c", code], vol))
    await a.launch(_req("gpuhop-novol-1", [python, "-c", code + "; import time; time.sleep(300)"]))
    scratch = a.scratch_dir / "gpuhop-novol-1"
    wait_for(lambda: (scratch / "me").exists(), 60, what="the volume-less job to start")
    attempt_uid = a.uids.get("attempt:gpuhop-novol-1")
    assert int((scratch / "me").read_text()) == attempt_uid and attempt_uid != vol_uid
    assert scratch.stat().st_uid == attempt_uid and stat.S_IMODE(scratch.stat().st_mode) == 0o700

    async def exited() -> bool:
        insts = {i.name: i for i in await a.list_instances()}
        return insts["gpuhop-withvol-1"].state is InstanceState.EXITED

    for _ in range(1200):
        if await exited():
            break
        await asyncio.sleep(0.05)
    assert int((a.volume_dir("v1") / "me").read_text()) == vol_uid
    marker = a.volume_dir("v1") / ".gpuhop" / "gpuhop-withvol-1.exit"
    assert marker.stat().st_uid == vol_uid  # written as the job's user, not as root
    await a.terminate("gpuhop-withvol-1")
    await a.terminate("gpuhop-novol-1")
    assert not scratch.exists() and a.uids.get("attempt:gpuhop-novol-1") is None
    assert a.uids.get("volume:v1") == vol_uid  # a volume keeps its uid for its next attempt
    await a.delete_volume("v1")
    assert a.uids.get("volume:v1") is None
    await a.close()


async def test_start_warns_once_when_local_jobs_are_not_isolated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = tmp_path / "fake-docker"  # a CLI whose engine does not answer, as on this machine
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    settings = LocalSettings(container_runtime=str(fake), volumes_dir=tmp_path / "private" / "volumes")
    (tmp_path / "private").mkdir(mode=0o700)  # unreachable for job users: no "user" either
    os.chmod(tmp_path / "private", 0o700)
    a = LocalAdapter(settings, _ctx(tmp_path))
    with caplog.at_level(logging.INFO, logger="adapters.local"):
        await a.start()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NOT isolated" in warnings[0].getMessage()
    assert (await a.isolation()).mode == "none"
    await a.close()


async def test_a_container_runtime_counts_only_when_its_engine_answers(tmp_path: Path) -> None:
    dead, live = tmp_path / "dead-docker", tmp_path / "live-docker"
    dead.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    live.write_text('#!/bin/sh\n[ "$1" = info ] && exit 0\nexit 2\n')
    for f in (dead, live):
        f.chmod(0o755)
    assert await detect_runtime(str(dead)) is None
    assert await detect_runtime(str(live)) == str(live)
    if shutil.which("docker"):  # this machine has the CLI but no engine: not a runtime
        proc = await asyncio.create_subprocess_exec(
            "docker", "info", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        engine_answers = await proc.wait() == 0
        assert (await detect_runtime("docker") is not None) == engine_answers


@pytest.mark.parametrize(
    ("wanted", "runtime", "switch", "unreachable", "mode", "error"),
    [
        ("auto", "/usr/bin/docker", True, None, "container", False),
        ("auto", None, True, None, "user", False),
        ("auto", None, True, "/root is 0700", "none", False),
        ("auto", None, False, None, "none", False),
        ("container", None, True, None, "none", True),
        ("container", "/usr/bin/podman", False, None, "container", False),
        ("user", "/usr/bin/docker", True, None, "user", False),
        ("user", None, False, None, "none", True),
        ("none", "/usr/bin/docker", True, None, "none", False),
    ],
)
def test_choose_isolation(wanted: Any, runtime: str | None, switch: bool, unreachable: str | None,
                          mode: str, error: bool) -> None:
    choice = choose(wanted, runtime, switch, unreachable)
    assert (choice.mode, bool(choice.error)) == (mode, error)
    if mode == "none" and not error:
        assert choice.reason


def test_container_command_line_has_no_secret_and_pins_the_gpus() -> None:
    argv = container_argv(
        "/usr/bin/docker", "gpuhop-j-1", "pytorch/pytorch:2.4", ["python3", "train.py", "--x=$(id)"],
        ["HF_TOKEN", "GPUHOP_JOB_ID"], {"GPUHOP_VOLUME": "/workspace", "HOME": "/gpuhop/scratch"},
        (200123, 200123), [44], [(Path("/v/vol"), "/workspace"), (Path("/v/.scratch/x"), "/gpuhop/scratch")],
        [1, 3],
    )
    assert argv[:3] == ["/usr/bin/docker", "run", "--rm"]
    assert argv[argv.index("--user") + 1] == "200123:200123"
    assert argv[argv.index("--gpus") + 1] == '"device=1,3"'
    assert argv[argv.index("--group-add") + 1] == "44"
    assert "type=bind,source=/v/vol,target=/workspace" in argv
    assert ["-e", "HF_TOKEN"] == argv[argv.index("HF_TOKEN") - 1 : argv.index("HF_TOKEN") + 1]  # name only
    assert argv[-5:] == ["--", "pytorch/pytorch:2.4", "python3", "train.py", "--x=$(id)"]
    cpu = container_argv("podman", "gpuhop-j-2", "img", ["true"], [], {}, None, [], [], [])
    assert "--gpus" not in cpu and "--user" not in cpu
    pod_gpu = container_argv("/usr/bin/podman", "gpuhop-j-3", "img", ["true"], [], {}, None, [], [], [0])
    assert pod_gpu[pod_gpu.index("--device") + 1] == "nvidia.com/gpu=0"


def test_uid_registry_never_shares_a_uid_and_is_stable(tmp_path: Path) -> None:
    reg = UidRegistry(tmp_path / "uids.json", 300000, 300003)
    uids = [reg.uid_for(f"volume:v{i}") for i in range(4)]
    assert len(set(uids)) == 4 and all(300000 <= u <= 300003 for u in uids)
    assert UidRegistry(tmp_path / "uids.json", 300000, 300003).uid_for("volume:v2") == uids[2]
    with pytest.raises(LookupError):
        reg.uid_for("volume:v4")
    reg.release("volume:v1")
    assert reg.uid_for("attempt:gpuhop-x-1") == uids[1]
    assert stat.S_IMODE((tmp_path / "uids.json").stat().st_mode) == 0o600
    system = UidRegistry(tmp_path / "sys.json", 0, 0)  # uid 0 belongs to root: never handed out
    with pytest.raises(LookupError):
        system.uid_for("volume:v")
