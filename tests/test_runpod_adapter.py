"""The RunPod adapter against the RunPod simulator (through the real `runpod` SDK): offers,
idempotent launches, hostile strings, state normalization, volumes and error mapping."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import runpod

from adapters.base import AdapterContext, AuthError, NoCapacity, PermanentError, RetryLater
from adapters.runpod import RunPodAdapter, RunPodSettings
from adapters.runpod.client import gql_string
from adapters.runpod.status import STATUS_TABLE, pod_state
from orchestrator.models import CapacityType, InstanceState, LaunchRequest, Offer, ProviderVolume
from simulators.runpod import RunPodSimulator
from tests.runpod_fixtures import (
    API_KEY,
    adapter_for,
    admin,
    no_process_left,
    running_sim,
    sim_pods,
    wait_until,
)


@pytest.fixture
async def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunPodSimulator]:
    async with running_sim(tmp_path, monkeypatch) as s:
        yield s


@pytest.fixture
async def adapter(sim: RunPodSimulator, tmp_path: Path) -> AsyncIterator[RunPodAdapter]:
    a = adapter_for(sim, tmp_path)
    await a.start()
    try:
        yield a
    finally:
        # every test leaves nothing running: terminate what is left, then check the processes
        for inst in await a.list_instances():
            await a.terminate(inst.instance_id)
        await wait_until(lambda: no_process_left(sim))
        assert all(not p["processRunning"] for p in await sim_pods(sim))
        await a.close()


def pick(offers: list[Offer], gpu: str, region: str, capacity: CapacityType = CapacityType.ON_DEMAND,
         count: int = 1, volumes: bool | None = None) -> Offer:
    for o in offers:
        if (o.gpu, o.region, o.capacity, o.gpu_count) == (gpu, region, capacity, count) and (
            volumes is None or o.supports_volumes == volumes
        ):
            return o
    raise AssertionError(f"no offer {gpu} {region} {capacity} x{count}")


def request(offer: Offer, name: str = "gpuhop-job1-1", script: str = "pass",
            env: dict[str, str] | None = None, volume: ProviderVolume | None = None,
            image: str = "python:3.11-slim") -> LaunchRequest:
    return LaunchRequest(
        name=name,
        idempotency_key=f"{name}:{offer.offer_id}",
        job_id="job1",
        attempt=1,
        offer=offer,
        image=image,
        command=[sys.executable, "-c", script],
        env={"GPUHOP_JOB_ID": "job1", "GPUHOP_ATTEMPT": "1", "GPUHOP_ATTEMPT_NAME": name, **(env or {})},
        disk_gb=20,
        volume=volume,
        mount_path="/workspace",
    )


DUMP_ENV = (
    "import json, os; "
    "open(os.path.join(os.environ['GPUHOP_VOLUME'], 'env.json'), 'w').write(json.dumps(dict(os.environ)))"
)


async def test_offers_are_normalized_and_cached(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offers = await adapter.offers()
    assert offers and all(o.provider == "runpod" for o in offers)
    assert "RTX 6000 Ada" not in {o.gpu for o in offers} and None not in {o.gpu for o in offers}
    assert {o.region for o in offers} == {"US-TX-3", "EU-RO-1", "CA-MTL-1"}
    secure = pick(offers, "RTX-4090", "US-TX-3", count=2, volumes=True)
    assert secure.price_per_hour == pytest.approx(2 * 0.69) and secure.vram_gb == 24
    community = pick(offers, "RTX-4090", "US-TX-3", count=2, volumes=False)
    assert community.price_per_hour == pytest.approx(2 * 0.34)
    spot = pick(offers, "H100-SXM", "EU-RO-1", CapacityType.SPOT)
    assert spot.price_per_hour == pytest.approx(2.79) and spot.supports_volumes
    # spot only where RunPod takes bids
    assert not [o for o in offers if o.gpu == "RTX-4090" and o.capacity == CapacityType.SPOT]
    # counts follow availableGpuCounts: 4 secure H100 PCIe in EU-RO-1 -> up to x4, not x5
    pcie = [o for o in offers if o.gpu == "H100-PCIE" and o.supports_volumes]
    assert max(o.gpu_count for o in pcie) == 4
    calls = sim.calls
    assert await adapter.offers() == offers
    assert sim.calls == calls  # served from the cache


async def test_offers_respect_settings(sim: RunPodSimulator, tmp_path: Path) -> None:
    a = adapter_for(sim, tmp_path, cloud_types=["secure"], interruptible=False,
                    data_centers=["CA-MTL-1"], max_gpu_count=2)
    offers = await a.offers()
    assert offers
    assert {o.region for o in offers} == {"CA-MTL-1"}
    assert all(o.supports_volumes and o.capacity == CapacityType.ON_DEMAND for o in offers)
    assert max(o.gpu_count for o in offers) == 2


async def test_launch_is_idempotent_by_name(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick(await adapter.offers(), "L40S", "EU-RO-1", volumes=True)
    first = await adapter.launch(request(offer))
    second = await adapter.launch(request(offer))
    assert first.instance_id == second.instance_id
    assert first.region == "EU-RO-1" and first.price_per_hour == pytest.approx(0.86)
    assert len([p for p in await sim_pods(sim) if p["name"] == "gpuhop-job1-1"]) == 1
    [row] = await sim_pods(sim)
    assert row["env"]["GPUHOP_LINGER"] == "1" and row["env"]["GPUHOP_VOLUME"] == "/workspace"
    assert row["cloudType"] == "SECURE" and row["dataCenterId"] == "EU-RO-1"


async def test_hostile_strings_arrive_byte_exact(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    hostile = 'q"uote \\back\\slash\nnew"line\r\t"}){ injected: true } # ünïcødé 🚀 \x01\x1f\u2028 $HOME `x`'
    image = 'img"}) { id } mutation { podTerminate(input: {podId: "x"}) }'
    offer = pick(await adapter.offers(), "RTX-4090", "US-TX-3", volumes=False)
    inst = await adapter.launch(request(offer, script=DUMP_ENV, env={"HOSTILE": hostile, "PLAIN": "ok"},
                                        image=image))
    volume = sim.runtime.volume_dir(f"pod-{inst.instance_id}")
    out = await wait_until(lambda: (volume / "env.json").exists() and (volume / "env.json"))
    env = await wait_until(lambda: _load(out))
    assert env["HOSTILE"] == hostile and env["PLAIN"] == "ok"
    assert env["GPUHOP_LINGER"] == "1" and env["GPUHOP_VOLUME"] == str(volume)
    assert sim.world.pods[inst.instance_id].image == image
    assert gql_string('a"b\\c\n') == 'a\\"b\\\\c\\n'


def _load(path: Path) -> dict[str, str] | None:
    try:
        return dict(json.loads(path.read_text()))
    except ValueError:
        return None  # written but not complete yet


async def test_command_runs_with_the_volume(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    vol = await adapter.ensure_volume("ckpt", 10, "US-TX-3")
    offer = pick(await adapter.offers(), "RTX-A6000", "US-TX-3", volumes=True)
    script = "import os; open(os.path.join(os.environ['GPUHOP_VOLUME'], 'marker'), 'w').write('hi')"
    inst = await adapter.launch(request(offer, script=script, volume=vol))
    marker = sim.runtime.volume_dir(vol.volume_id) / "marker"
    await wait_until(marker.exists)
    assert marker.read_text() == "hi"
    assert sim.world.pods[inst.instance_id].network_volume == vol.volume_id
    # a volume in another data center, or a Community offer, is refused before RunPod is asked
    elsewhere = pick(await adapter.offers(), "L40S", "EU-RO-1", volumes=True)
    with pytest.raises(PermanentError):
        await adapter.launch(request(elsewhere, name="gpuhop-job2-1", volume=vol))
    community = pick(await adapter.offers(), "RTX-A6000", "US-TX-3", volumes=False)
    with pytest.raises(PermanentError):
        await adapter.launch(request(community, name="gpuhop-job3-1", volume=vol))


async def test_spot_launch(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick(await adapter.offers(), "H100-SXM", "EU-RO-1", CapacityType.SPOT)
    inst = await adapter.launch(request(offer))
    pod = sim.world.pods[inst.instance_id]
    assert pod.interruptible and pod.cost_per_hr == pytest.approx(2.79)
    [listed] = await adapter.list_instances()
    assert listed.extra["pod_type"] == "INTERRUPTABLE" and listed.region == "EU-RO-1"


async def test_list_instances_normalizes_states(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offers = await adapter.offers()
    offer = pick(offers, "RTX-4090", "US-TX-3", volumes=True)
    a = await adapter.launch(request(offer, name="gpuhop-a-1", script="import time; time.sleep(60)"))
    b = await adapter.launch(request(offer, name="gpuhop-b-1", script="import time; time.sleep(60)"))
    foreign = await asyncio.to_thread(runpod.create_pod, "someone-else", "img", "NVIDIA GeForce RTX 4090")

    def states(insts: list[Any]) -> dict[str, InstanceState]:
        return {i.name: i.state for i in insts}

    listed = await adapter.list_instances()
    assert states(listed) == {"gpuhop-a-1": InstanceState.PENDING, "gpuhop-b-1": InstanceState.PENDING}
    assert foreign["id"] not in {i.instance_id for i in listed}

    async def both_running() -> bool:
        return set(states(await adapter.list_instances()).values()) == {InstanceState.RUNNING}

    await wait_until(both_running)
    await admin(sim, "POST", f"/_sim/pods/{a.instance_id}/preempt", {"wait": True})
    await asyncio.to_thread(runpod.stop_pod, b.instance_id)
    listed = {i.name: i for i in await adapter.list_instances()}
    assert listed["gpuhop-a-1"].state == InstanceState.PREEMPTED
    assert listed["gpuhop-a-1"].reason.startswith("Exited by Runpod")
    assert listed["gpuhop-b-1"].state == InstanceState.EXITED
    assert listed["gpuhop-a-1"].region == "US-TX-3"
    assert listed["gpuhop-a-1"].price_per_hour == pytest.approx(0.69)

    await adapter.terminate(a.instance_id)
    assert {i.name for i in await adapter.list_instances()} == {"gpuhop-b-1"}
    await asyncio.to_thread(runpod.terminate_pod, foreign["id"])


def test_status_table() -> None:
    def pod(status: str, runtime: Any = None, change: str = "") -> dict[str, Any]:
        return {"desiredStatus": status, "runtime": runtime, "lastStatusChange": change}

    assert pod_state(pod("RUNNING")) == InstanceState.PENDING
    assert pod_state(pod("RUNNING", {"uptimeInSeconds": 3})) == InstanceState.RUNNING
    for change in ("Exited by Runpod: Mon", "exited by RunPod: x", "EXITED BY RUN POD"):
        assert pod_state(pod("EXITED", change=change)) == InstanceState.PREEMPTED
    assert pod_state(pod("EXITED", change="Exited by user: Mon")) == InstanceState.EXITED
    assert pod_state(pod("TERMINATED")) == InstanceState.TERMINATED
    assert pod_state(pod("SOMETHING_NEW")) == InstanceState.PENDING
    assert set(STATUS_TABLE.values()) == set(InstanceState) - {InstanceState.STOPPING}


async def test_terminate_is_idempotent(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick(await adapter.offers(), "RTX-4090", "US-TX-3", volumes=True)
    inst = await adapter.launch(request(offer))
    await adapter.terminate(inst.instance_id)
    await adapter.terminate(inst.instance_id)
    await adapter.terminate("doesnotexist00")
    assert await adapter.list_instances() == []
    await wait_until(lambda: no_process_left(sim))
    ledger = await admin(sim, "GET", "/_sim/ledger")
    assert not [e for e in ledger["entries"] if e["kind"] == "pod" and e["running"]]


async def test_no_capacity(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offers = await adapter.offers()
    await admin(sim, "POST", "/_sim/capacity", {"count": 0})
    with pytest.raises(NoCapacity):
        await adapter.launch(request(pick(offers, "L40S", "EU-RO-1", volumes=True)))
    with pytest.raises(NoCapacity):
        await adapter.launch(request(pick(offers, "H100-SXM", "EU-RO-1", CapacityType.SPOT)))
    assert await sim_pods(sim) == []


async def test_transient_faults_are_retried_then_retry_later(
    sim: RunPodSimulator, adapter: RunPodAdapter
) -> None:
    await admin(sim, "POST", "/_sim/faults", {"kind": "500", "count": 1})
    assert await adapter.list_instances() == []  # retried past one 500
    await admin(sim, "POST", "/_sim/faults", {"kind": "graphql", "count": 1})
    assert await adapter.list_instances() == []  # "Something went wrong" is transient too
    for kind in ("429", "500"):
        await admin(sim, "POST", "/_sim/faults", {"kind": kind, "count": 50})
        calls = sim.calls
        with pytest.raises(RetryLater) as info:
            await adapter.list_instances()
        assert sim.calls - calls == 3  # retry_attempts, then give up
        assert API_KEY not in str(info.value)
        await admin(sim, "POST", "/_sim/faults", {"clear": True})


async def test_timeouts_are_bounded(sim: RunPodSimulator, tmp_path: Path) -> None:
    a = adapter_for(sim, tmp_path, request_timeout_seconds=0.3, retry_attempts=2,
                    retry_budget_seconds=2.0)
    await admin(sim, "POST", "/_sim/faults", {"kind": "timeout", "count": 5, "seconds": 1.0})
    started = time.monotonic()
    with pytest.raises(RetryLater):
        await a.offers()
    assert time.monotonic() - started < 2.5
    await admin(sim, "POST", "/_sim/faults", {"clear": True})
    await asyncio.sleep(1.0)  # let the abandoned SDK threads get their answers
    assert await a.offers()


async def test_other_graphql_errors_are_permanent(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    await admin(sim, "POST", "/_sim/faults", {"kind": "graphql", "count": 1, "message": "Invalid input."})
    with pytest.raises(PermanentError) as info:
        await adapter.list_instances()
    assert not isinstance(info.value, AuthError) and "Invalid input." in str(info.value)


async def test_auth_errors(sim: RunPodSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = adapter_for(sim, tmp_path, api_key="rpa_WRONG_KEY_123")
    with pytest.raises(AuthError) as info:
        await wrong.offers()
    assert "rpa_WRONG_KEY_123" not in str(info.value) and "rpa_WRONG_KEY_123" not in repr(wrong.client)
    ctx = AdapterContext("gpuhop", tmp_path, tmp_path, "http://127.0.0.1:9")
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(AuthError, match="RUNPOD_API_KEY"):
        RunPodAdapter(RunPodSettings(api_url=sim.url), ctx)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    from_env = RunPodAdapter(RunPodSettings(api_url=sim.url), ctx)
    assert await from_env.list_instances() == []
    with pytest.raises(ValueError):
        RunPodSettings.model_validate({"api_url": sim.url, "surprise": 1})


async def test_ensure_volume_is_idempotent(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    first = await adapter.ensure_volume("data", 50, "EU-RO-1")
    again = await adapter.ensure_volume("data", 50, "EU-RO-1")
    assert first == again and first.region == "EU-RO-1" and first.size_gb == 50
    other = await adapter.ensure_volume("data", 50, "US-TX-3")
    assert other.volume_id != first.volume_id
    both = await asyncio.gather(adapter.ensure_volume("x", 5, "CA-MTL-1"),
                                adapter.ensure_volume("x", 5, "CA-MTL-1"))
    assert both[0] == both[1]
    await adapter.delete_volume(first.volume_id)
    await adapter.delete_volume(first.volume_id)
    names = {(v["name"], v["dataCenterId"]) for v in (await admin(sim, "GET", "/_sim/pods"))["volumes"]}
    assert names == {("data", "US-TX-3"), ("x", "CA-MTL-1")}
    hostile = await adapter.ensure_volume('v"ol\n', 1, "US-TX-3")
    assert hostile.name == 'v"ol\n'
