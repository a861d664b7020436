"""The local adapter against real processes: the agent is really spawned, jobs really run, die,
get killed and are terminated, and nothing is mocked.

These tests exist because the local adapter's promises are about processes and files (a job
outlives the daemon, a killed agent takes its job with it, a terminate always ends in no process
at all), and only real processes can break them. Every test ends by terminating what it started
and asserting that no process of its state directory is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters.base import AdapterContext, NoCapacity, PermanentError
from adapters.local import (
    MARKER_ENV,
    VANISHED_REASON,
    DetectedGpus,
    LocalAdapter,
    LocalSettings,
    parse_nvidia_smi,
)
from orchestrator.models import Instance, InstanceState, LaunchRequest, Offer, ProviderVolume

PY = sys.executable
SLEEPER = "import time; time.sleep(60)"

# --------------------------------------------------------------------------- helpers


def _live_pids_under(root: Path) -> list[int]:
    """Live (not zombie) processes whose command line or environment mention `root`."""
    needle = os.fsencode(str(root))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            if stat[stat.rfind(")") + 2] in "ZX":
                continue
            blob = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            blob += Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if needle in blob:
            found.append(int(entry.name))
    return found


def _job_processes(inst_dir: Path) -> list[int]:
    """Live processes carrying the instance's marker, other than its agent."""
    marker = f"{MARKER_ENV}={inst_dir}".encode()
    out = []
    for pid in _live_pids_under(inst_dir):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in environ and b"--daemonize" not in cmdline:
            out.append(pid)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


async def _until(predicate, within: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` (async) until it returns something truthy, for at most `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _instance(adapter: LocalAdapter, name: str) -> Instance | None:
    return next((i for i in await adapter.list_instances() if i.name == name), None)


async def _wait_state(
    adapter: LocalAdapter, name: str, state: InstanceState, within: float = 30.0
) -> Instance:
    async def check() -> Instance | None:
        inst = await _instance(adapter, name)
        return inst if inst is not None and inst.state is state else None

    result: Instance = await _until(check, within, f"{name} to be {state}")
    return result


def _offer(adapter: LocalAdapter, offer_id: str = "cpu", gpus: int = 0) -> Offer:
    from orchestrator.models import CapacityType

    return Offer(
        provider="local",
        offer_id=offer_id,
        region="local",
        gpu="RTX-4090" if gpus else None,
        gpu_count=gpus,
        vram_gb=24 if gpus else 0,
        vcpu=1,
        memory_gb=1,
        disk_gb=0,
        capacity=CapacityType.ON_DEMAND,
        price_per_hour=0.5 * gpus,
    )


def _req(
    adapter: LocalAdapter,
    name: str,
    code: str = SLEEPER,
    *,
    offer_id: str = "cpu",
    env: dict[str, str] | None = None,
    volume: ProviderVolume | None = None,
    command: list[str] | None = None,
) -> LaunchRequest:
    gpus = int(offer_id.split(":")[1]) if offer_id.startswith("gpu:") else 0
    return LaunchRequest(
        name=name,
        idempotency_key=f"{name}:{offer_id}",
        job_id=name.split("-")[1],
        attempt=1,
        offer=_offer(adapter, offer_id, gpus),
        image="python:3.11-slim",
        command=command or [PY, "-c", code],
        env=env or {},
        disk_gb=10,
        volume=volume,
    )


def _job_pid(inst: Instance) -> int:
    return int(inst.extra["job_pid"])


def _agent_pid(inst: Instance) -> int:
    return int(inst.extra["agent_pid"])


async def _job_started(adapter: LocalAdapter, inst: Instance) -> Instance:
    """launch() returns once agent.pid exists; job.pid follows a moment later."""

    async def check() -> Instance | None:
        cur = await _instance(adapter, inst.name)
        return cur if cur is not None and "job_pid" in cur.extra else None

    started: Instance = await _until(check, 30, "job.pid")
    return started


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def ctx(tmp_path: Path) -> AdapterContext:
    return AdapterContext(
        prefix="gpuhop",
        state_dir=tmp_path / "state",
        logs_dir=tmp_path / "logs",
        public_url="http://127.0.0.1:1",
    )


def _make(ctx: AdapterContext, **settings: object) -> LocalAdapter:
    base: dict[str, object] = {
        "gpu_model": "RTX 4090",
        "gpu_slots": 2,
        "cpu_slots": 2,
        "price_per_gpu_hour": 0.25,
        # these tests are about processes and files; isolation has tests/test_security.py
        "isolation": "none",
    }
    base.update(settings)
    base.setdefault("stop_grace_seconds", 2)
    return LocalAdapter(LocalSettings.model_validate(base), ctx)


@pytest.fixture
async def adapter(ctx: AdapterContext, tmp_path: Path) -> AsyncIterator[LocalAdapter]:
    a = _make(ctx)
    yield a
    # finalizer: terminate everything this test left and prove no process survived
    instances = a.root / "instances"
    if instances.is_dir():
        await asyncio.gather(*(a.terminate(p.name) for p in instances.iterdir()))
    await _assert_nothing_left(tmp_path)


async def _assert_nothing_left(root: Path) -> None:
    async def none_left() -> bool:
        return not _live_pids_under(root)

    with contextlib.suppress(AssertionError):
        await _until(none_left, 30)
    assert _live_pids_under(root) == [], "a test left processes behind"


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "NVIDIA GeForce RTX 4090, 24564 MiB\nNVIDIA GeForce RTX 4090, 24564 MiB\n",
            DetectedGpus("RTX-4090", 2, 24, (0, 1)),
        ),
        ("NVIDIA H100 80GB HBM3, 81559 MiB\n", DetectedGpus("H100-SXM", 1, 80, (0,))),
        (  # mixed: the first GPU's model, only its GPUs, their indices
            "Tesla T4, 15360 MiB\nNVIDIA A10G, 23028 MiB\nNVIDIA T4, 15360 MiB\n",
            DetectedGpus("T4", 2, 15, (0, 2)),
        ),
        ("NVIDIA Quadro Fancy 9000, 49152 MiB\n", DetectedGpus(None, 1, 48, (0,))),
        ("", DetectedGpus(None, 0, 0, ())),
        ("No devices were found\n", DetectedGpus(None, 0, 0, ())),
    ],
)
def test_parse_nvidia_smi(text: str, expected: DetectedGpus) -> None:
    assert parse_nvidia_smi(text) == expected


def test_settings_validate() -> None:
    s = LocalSettings.model_validate({"gpu_model": "4090", "price_per_gpu_hour": 0.3})
    assert s.gpu_model == "RTX-4090"
    assert s.gpu_slots is None and s.cpu_slots == 2 and s.region == "local"
    assert "GPU" in (LocalSettings.model_fields["gpu_slots"].description or "")
    for bad in (
        {"gpu_model": "Voodoo 5"},
        {"price_per_gpu_hour": -1},
        {"price_per_gpu_hour": 1001},
        {"surprise": 1},
        {"region": "no spaces"},
    ):
        with pytest.raises(ValidationError):
            LocalSettings.model_validate(bad)


async def test_no_gpu_configured_means_cpu_offers_only(ctx: AdapterContext) -> None:
    a = _make(ctx, gpu_model=None, gpu_slots=0, cpu_slots=3, cpu_slot_price_per_hour=0.01)
    offers = await a.offers()
    assert [o.offer_id for o in offers] == ["cpu"]
    assert offers[0].gpu is None and offers[0].gpu_count == 0 and offers[0].available == 3
    assert offers[0].price_per_hour == 0.01


# --------------------------------------------------------------------------- offers and slots


async def test_offers_reflect_slots_and_shrink(adapter: LocalAdapter) -> None:
    offers = {o.offer_id: o for o in await adapter.offers()}
    assert sorted(offers) == ["cpu", "gpu:1", "gpu:2"]
    g2 = offers["gpu:2"]
    assert (g2.gpu, g2.gpu_count, g2.vram_gb, g2.disk_gb) == ("RTX-4090", 2, 24, 0)
    assert (g2.price_per_hour, offers["gpu:1"].price_per_hour, offers["cpu"].price_per_hour) == (
        0.5,
        0.25,
        0.0,
    )
    assert g2.capacity == "on-demand" and g2.supports_volumes and g2.region == "local"
    assert g2.vcpu == os.cpu_count() and g2.memory_gb >= 0
    assert offers["cpu"].available == 2 and offers["gpu:1"].available == 2

    first = await adapter.launch(_req(adapter, "gpuhop-a-1", offer_id="gpu:1"))
    assert first.state is InstanceState.RUNNING
    assert first.extra["cuda_visible_devices"] == "0"
    offers = {o.offer_id: o for o in await adapter.offers()}
    assert sorted(offers) == ["cpu", "gpu:1"] and offers["gpu:1"].available == 1

    # two GPUs are no longer there: the slot is gone
    with pytest.raises(NoCapacity):
        await adapter.launch(_req(adapter, "gpuhop-b-1", offer_id="gpu:2"))
    second = await adapter.launch(_req(adapter, "gpuhop-c-1", offer_id="gpu:1"))
    assert second.extra["cuda_visible_devices"] == "1"
    with pytest.raises(NoCapacity):
        await adapter.launch(_req(adapter, "gpuhop-d-1", offer_id="gpu:1"))

    for name in ("gpuhop-e-1", "gpuhop-f-1"):
        await adapter.launch(_req(adapter, name))
    assert await adapter.offers() == []
    with pytest.raises(NoCapacity):
        await adapter.launch(_req(adapter, "gpuhop-g-1"))
    with pytest.raises(PermanentError):
        await adapter.launch(_req(adapter, "gpuhop-h-1", offer_id="tpu:9"))

    await adapter.terminate("gpuhop-a-1")
    offers = {o.offer_id: o for o in await adapter.offers()}
    assert sorted(offers) == ["gpu:1"]
    third = await adapter.launch(_req(adapter, "gpuhop-i-1", offer_id="gpu:1"))
    assert third.extra["cuda_visible_devices"] == "0"


# --------------------------------------------------------------------------- running jobs

HOSTILE = {
    "QUOTES": "it's \"double\" and 'single'",
    "NEWLINES": "line one\nline two\r\nthree",
    "SUBST": "$(touch {marker}) `touch {marker}` ${{HOME}} $HOME; rm -rf /nope &&",
    "UNICODE": "héllo ✓ 日本語 \U0001f600 \u202e",
    "BACKSLASH": "C:\\path\\to\\x \\n \\0",
    "SPACES": "  leading and trailing  ",
    "EMPTY": "",
}

ENV_DUMP = """
import json, os, sys
keys = json.loads(sys.argv[1])
out = {k: os.environ.get(k) for k in keys}
out["argv"] = sys.argv[2:]
with open(os.path.join(os.environ["GPUHOP_VOLUME"], "env.json"), "w", encoding="utf-8") as fh:
    json.dump(out, fh)
print("hello from the job", flush=True)
"""


async def test_launch_env_volume_and_exit_zero(
    adapter: LocalAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUHOP_DAEMON_SECRET", "must-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-not-leak-either")
    marker = tmp_path / "pwned"
    env = {k: v.format(marker=marker) for k, v in HOSTILE.items()}
    env["GPUHOP_JOB_ID"] = "envjob"
    env["GPUHOP_ATTEMPT"] = "1"
    agent_only = {  # what the engine gives the agent, never the job
        "GPUHOP_TOKEN": "tok-very-secret-123",
        "GPUHOP_CALLBACK_URL": "http://127.0.0.1:1/v1/agent/report",
        "GPUHOP_HEARTBEAT": "10",
        "GPUHOP_ATTEMPT_NAME": "gpuhop-envjob-1",
    }
    volume = await adapter.ensure_volume("vol-1", 5, "local")
    assert volume == ProviderVolume("local", "vol-1", "vol-1", "local", 5)
    vol_dir = adapter.volume_dir("vol-1")
    assert vol_dir.is_dir() and (vol_dir.stat().st_mode & 0o777) == 0o700
    assert adapter.state_dir not in vol_dir.parents  # volumes live outside the state dir

    keys = [
        *env,
        *agent_only,
        "GPUHOP_VOLUME",
        "GPUHOP_EXIT_REPORT_MAX",
        "GPUHOP_AGENT_B64",
        "CUDA_VISIBLE_DEVICES",
        "GPUHOP_DAEMON_SECRET",
        "AWS_SECRET_ACCESS_KEY",
        "PATH",
    ]
    args = ["a b", "$(id)", "", "ünï"]
    req = _req(
        adapter,
        "gpuhop-envjob-1",
        command=[PY, "-c", ENV_DUMP, json.dumps(keys), *args],
        env={**env, **agent_only},
        volume=volume,
    )
    await adapter.launch(req)
    done = await _wait_state(adapter, "gpuhop-envjob-1", InstanceState.EXITED)
    assert (done.exit_code, done.exit_signal, done.stopped_by_us) == (0, None, False)

    seen = json.loads((vol_dir / "env.json").read_text(encoding="utf-8"))
    for key, value in env.items():
        assert seen[key] == value, key  # byte-exact, nothing interpreted by a shell
    assert seen["argv"] == args
    for key in (*agent_only, "GPUHOP_EXIT_REPORT_MAX", "GPUHOP_AGENT_B64"):
        assert seen[key] is None, key  # the agent keeps its own variables and the token
    assert seen["GPUHOP_VOLUME"] == str(vol_dir)
    assert seen["CUDA_VISIBLE_DEVICES"] == ""  # a CPU job sees no GPU
    assert seen["GPUHOP_DAEMON_SECRET"] is None and seen["AWS_SECRET_ACCESS_KEY"] is None
    assert seen["PATH"]
    assert not marker.exists()

    log_path = adapter.log_path("gpuhop-envjob-1")
    assert log_path is not None and "hello from the job" in log_path.read_text()
    assert (log_path.stat().st_mode & 0o777) == 0o600

    # the token is in no file, and the files gpuhop writes are private
    inst_dir = adapter.root / "instances" / "gpuhop-envjob-1"
    assert (inst_dir.stat().st_mode & 0o777) == 0o700
    assert (inst_dir / "request.json").stat().st_mode & 0o777 == 0o600
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file() and vol_dir not in path.parents:  # the job wrote env.json itself
            assert b"tok-very-secret-123" not in path.read_bytes(), path

    await adapter.delete_volume("vol-1")
    await adapter.delete_volume("vol-1")  # already gone is fine
    assert not vol_dir.exists()
    with pytest.raises(PermanentError):
        await adapter.ensure_volume("../escape", 1, "local")


async def test_scratch_volume_without_a_volume_and_exit_code(adapter: LocalAdapter) -> None:
    code = "import os, sys; open(os.path.join(os.environ['GPUHOP_VOLUME'], 'x'), 'w'); sys.exit(3)"
    await adapter.launch(_req(adapter, "gpuhop-three-1", code, offer_id="gpu:1"))
    done = await _wait_state(adapter, "gpuhop-three-1", InstanceState.EXITED)
    assert (done.exit_code, done.exit_signal, done.stopped_by_us) == (3, None, False)
    assert "code 3" in done.reason
    scratch = adapter.scratch_dir / "gpuhop-three-1"
    assert (scratch / "x").exists() and (scratch.stat().st_mode & 0o777) == 0o700
    # an exited job frees its slot before it is terminated
    assert {o.offer_id for o in await adapter.offers()} == {"gpu:1", "gpu:2", "cpu"}


async def test_job_group_killed_by_someone_else(adapter: LocalAdapter) -> None:
    inst = await _job_started(adapter, await adapter.launch(_req(adapter, "gpuhop-k9-1")))
    os.killpg(_job_pid(inst), signal.SIGKILL)
    done = await _wait_state(adapter, "gpuhop-k9-1", InstanceState.EXITED)
    assert (done.exit_code, done.exit_signal, done.stopped_by_us) == (None, 9, False)


async def test_killed_agent_takes_its_job_and_reads_as_lost(adapter: LocalAdapter) -> None:
    inst = await _job_started(adapter, await adapter.launch(_req(adapter, "gpuhop-lost-1")))
    job_pid, agent_pid = _job_pid(inst), _agent_pid(inst)
    os.kill(agent_pid, signal.SIGKILL)

    async def job_gone() -> bool:
        return not _alive(job_pid)

    await _until(job_gone, 30, "PDEATHSIG to kill the job")
    lost = await _wait_state(adapter, "gpuhop-lost-1", InstanceState.TERMINATED)
    assert lost.exit_code is None and lost.exit_signal is None and not lost.stopped_by_us
    assert lost.reason == VANISHED_REASON
    assert await adapter.offers()  # the slot is free again


async def test_terminate_stops_everything_and_is_idempotent(adapter: LocalAdapter) -> None:
    inst = await _job_started(adapter, await adapter.launch(_req(adapter, "gpuhop-stop-1")))
    job_pid, agent_pid = _job_pid(inst), _agent_pid(inst)
    await adapter.terminate("gpuhop-stop-1")  # returns once every process is gone
    assert not _alive(job_pid) and not _alive(agent_pid)
    exit_info = json.loads((adapter.root / "instances" / "gpuhop-stop-1" / "exit.json").read_text())
    assert exit_info["stopped_by_us"] is True
    assert await _instance(adapter, "gpuhop-stop-1") is None
    await adapter.terminate("gpuhop-stop-1")
    await adapter.terminate("gpuhop-never-1")
    await adapter.terminate("../../etc")
    # a released name is not launched again
    again = await adapter.launch(_req(adapter, "gpuhop-stop-1"))
    assert again.state is InstanceState.TERMINATED


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


async def test_terminate_kills_a_job_that_ignores_sigterm_and_its_children(
    ctx: AdapterContext, tmp_path: Path
) -> None:
    a = _make(ctx, stop_grace_seconds=0.5)
    try:
        inst = await _job_started(a, await a.launch(_req(a, "gpuhop-stub-1", STUBBORN)))
        log_path = a.log_path("gpuhop-stub-1")
        assert log_path is not None

        async def child_pid() -> int:
            text = log_path.read_text().strip()
            return int(text) if text else 0

        grandchild = await _until(child_pid, 30, "the job's child")
        await a.terminate("gpuhop-stub-1")  # returns once every process is gone
        for pid in (_job_pid(inst), _agent_pid(inst), grandchild):
            assert not _alive(pid)
        exit_info = json.loads((a.root / "instances" / "gpuhop-stub-1" / "exit.json").read_text())
        assert exit_info["signal"] == 9 and exit_info["stopped_by_us"] is True
    finally:
        for p in (a.root / "instances").iterdir():
            await a.terminate(p.name)
        await _assert_nothing_left(tmp_path)


async def test_launch_twice_makes_one_process(adapter: LocalAdapter) -> None:
    req = _req(adapter, "gpuhop-twice-1")
    first, second = await asyncio.gather(adapter.launch(req), adapter.launch(req))
    third = await adapter.launch(req)
    assert first.extra["agent_pid"] == second.extra["agent_pid"] == third.extra["agent_pid"]
    await _job_started(adapter, first)
    assert len(_job_processes(adapter.root / "instances" / "gpuhop-twice-1")) == 1
    assert len(await adapter.list_instances()) == 1


async def test_a_restarted_daemon_finds_its_jobs(
    adapter: LocalAdapter, ctx: AdapterContext
) -> None:
    inst = await _job_started(
        adapter, await adapter.launch(_req(adapter, "gpuhop-keep-1", offer_id="gpu:2"))
    )
    reborn = _make(ctx)  # a new daemon process would build exactly this
    [seen] = await reborn.list_instances()
    assert (seen.name, seen.state, seen.extra["job_pid"]) == (
        "gpuhop-keep-1",
        InstanceState.RUNNING,
        str(_job_pid(inst)),
    )
    assert seen.price_per_hour == 0.5  # 2 GPUs at 0.25
    assert [o.offer_id for o in await reborn.offers()] == ["cpu"]  # both GPUs are held
    again = await reborn.launch(_req(reborn, "gpuhop-keep-1", offer_id="gpu:2"))
    assert again.extra["agent_pid"] == inst.extra["agent_pid"]
    await reborn.terminate("gpuhop-keep-1")
    assert not _alive(_job_pid(inst))


async def test_pending_then_lost_when_the_agent_never_writes_its_pid(adapter: LocalAdapter) -> None:
    for name, age in (("gpuhop-new-1", 1.0), ("gpuhop-old-1", 60.0)):
        inst_dir = adapter.root / "instances" / name
        inst_dir.mkdir(parents=True)
        (inst_dir / "request.json").write_text(
            json.dumps({"offer_id": "cpu", "gpu_indices": [], "launched_at": time.time() - age})
        )
    states = {i.name: i for i in await adapter.list_instances()}
    assert states["gpuhop-new-1"].state is InstanceState.PENDING
    assert states["gpuhop-old-1"].state is InstanceState.TERMINATED
    assert [o.offer_id for o in await adapter.offers()] == ["gpu:1", "gpu:2", "cpu"]  # 1 cpu left
    await adapter.terminate("gpuhop-old-1")
    assert {i.name for i in await adapter.list_instances()} == {"gpuhop-new-1"}
    # terminate waits for a pending agent to show up (to stop it); make this one old instead
    (adapter.root / "instances" / "gpuhop-new-1" / "request.json").write_text(
        json.dumps({"offer_id": "cpu", "launched_at": time.time() - 60})
    )


async def test_other_prefixes_and_bad_names_are_not_ours(adapter: LocalAdapter) -> None:
    for bad in ("../gpuhop-x-1", "gpuhop-../x", "other-x-1"):
        with pytest.raises(PermanentError):
            await adapter.launch(_req(adapter, bad))
    other = adapter.root / "instances" / "someoneelse-x-1"
    other.mkdir(parents=True)
    (other / "request.json").write_text(json.dumps({"offer_id": "cpu", "launched_at": time.time()}))
    assert await adapter.list_instances() == []
    assert adapter.log_path("gpuhop-none-1") is None


# --------------------------------------------------------------------------- billing


async def test_terminate_returns_the_final_bill_from_the_agents_times(
    ctx: AdapterContext, tmp_path: Path
) -> None:
    a = _make(ctx, cpu_slot_price_per_hour=1000.0)
    try:
        inst = await _job_started(a, await a.launch(_req(a, "gpuhop-bill-1")))
        inst_dir = a.root / "instances" / "gpuhop-bill-1"
        started = float((inst_dir / "started_at").read_text())
        assert inst.extra["agent_pid"]
        live = await _instance(a, "gpuhop-bill-1")
        assert live is not None and live.bill is not None
        assert live.bill.started_at == started and live.bill.ended_at is None  # still billing
        assert live.bill.cost_usd >= 0

        bill = await a.terminate("gpuhop-bill-1")
        assert bill is not None and bill.started_at == started
        exit_info = json.loads((inst_dir / "exit.json").read_text())
        ended = bill.ended_at
        assert ended is not None and ended == exit_info["ended_at"] and ended >= started
        assert bill.cost_usd == pytest.approx((ended - started) * 1000.0 / 3600)
        assert await a.terminate("gpuhop-bill-1") == bill  # idempotent, same final bill
        assert await a.terminate("gpuhop-never-1") is None
    finally:
        for p in (a.root / "instances").iterdir():
            await a.terminate(p.name)
        await _assert_nothing_left(tmp_path)


async def test_an_exited_job_is_billed_to_its_end_and_its_slot_price(adapter: LocalAdapter) -> None:
    await adapter.launch(_req(adapter, "gpuhop-short-1", "print('done')", offer_id="gpu:2"))
    done = await _wait_state(adapter, "gpuhop-short-1", InstanceState.EXITED)
    exit_info = json.loads((adapter.root / "instances" / "gpuhop-short-1" / "exit.json").read_text())
    assert done.bill is not None
    assert (done.bill.started_at, done.bill.ended_at) == (exit_info["started_at"], exit_info["ended_at"])
    assert done.bill.cost_usd == pytest.approx(
        (exit_info["ended_at"] - exit_info["started_at"]) * 0.5 / 3600  # two GPUs at 0.25
    )
    bill = await adapter.terminate("gpuhop-short-1")
    assert bill == done.bill
