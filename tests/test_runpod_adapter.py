"""The RunPod adapter against the RunPod simulator, over both transports (REST v2, the default,
and the SDK's GraphQL, each on the adapter's own aiohttp session): offers, idempotent launches
also when RunPod is slow, hostile strings, state normalization, bills that match the simulator's
ledger, volumes and error mapping."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import runpod
from pydantic import ValidationError

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


@pytest.fixture(params=["rest", "graphql"])
async def adapter(request: pytest.FixtureRequest, sim: RunPodSimulator, tmp_path: Path) -> AsyncIterator[RunPodAdapter]:
    a = adapter_for(sim, tmp_path, api=request.param)
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


@pytest.fixture
async def make_adapter(sim: RunPodSimulator, tmp_path: Path) -> AsyncIterator[Callable[..., RunPodAdapter]]:
    """Adapters with other settings; each is closed at the end."""
    made: list[RunPodAdapter] = []

    def make(**overrides: Any) -> RunPodAdapter:
        made.append(adapter_for(sim, tmp_path, **overrides))
        return made[-1]

    yield make
    for a in made:
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
    # Secure Cloud by data center, Community Cloud by country
    assert {o.region for o in offers} == {"US-TX-3", "EU-RO-1", "CA-MTL-1", "US", "RO", "CA"}
    secure = pick(offers, "RTX-4090", "US-TX-3", count=2, volumes=True)
    assert secure.price_per_hour == pytest.approx(2 * 0.69) and secure.vram_gb == 24
    community = pick(offers, "RTX-4090", "US", count=2, volumes=False)
    assert community.price_per_hour == pytest.approx(2 * 0.34)
    # no spot: RunPod ended it in September 2026
    assert not [o for o in offers if o.capacity == CapacityType.SPOT]
    # counts follow availableGpuCounts: 4 secure H100 PCIe in EU-RO-1 -> up to x4, not x5
    pcie = [o for o in offers if o.gpu == "H100-PCIE" and o.supports_volumes]
    assert max(o.gpu_count for o in pcie) == 4
    calls = sim.calls
    assert await adapter.offers() == offers
    assert sim.calls == calls  # served from the cache


async def test_offers_respect_settings(make_adapter: Callable[..., RunPodAdapter]) -> None:
    a = make_adapter(cloud_types=["secure"], interruptible=False, data_centers=["CA-MTL-1"], max_gpu_count=2)
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
    offer = pick(await adapter.offers(), "RTX-4090", "US", volumes=False)
    inst = await adapter.launch(request(offer, script=DUMP_ENV, env={"HOSTILE": hostile, "PLAIN": "ok"},
                                        image=image))
    volume = sim.runtime.volume_dir(f"pod-{inst.instance_id}")
    out = await wait_until(lambda: (volume / "env.json").exists() and (volume / "env.json"))
    env = await wait_until(lambda: _load(out))
    assert env["HOSTILE"] == hostile and env["PLAIN"] == "ok"
    assert env["GPUHOP_VOLUME"] == str(volume)
    assert ("GPUHOP_LINGER", "1") in sim.world.pods[inst.instance_id].env  # what RunPod was given
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
    await wait_until(lambda: marker.exists() and marker.read_text())  # written, not just created
    assert marker.read_text() == "hi"
    assert sim.world.pods[inst.instance_id].network_volume == vol.volume_id
    # a volume in another data center, or a Community offer, is refused before RunPod is asked
    elsewhere = pick(await adapter.offers(), "L40S", "EU-RO-1", volumes=True)
    with pytest.raises(PermanentError):
        await adapter.launch(request(elsewhere, name="gpuhop-job2-1", volume=vol))
    community = pick(await adapter.offers(), "RTX-A6000", "US", volumes=False)
    with pytest.raises(PermanentError):
        await adapter.launch(request(community, name="gpuhop-job3-1", volume=vol))


async def test_spot_launch_only_when_opted_in(sim: RunPodSimulator, make_adapter: Callable[..., RunPodAdapter]) -> None:
    # the past, kept behind the opt-in while RunPod still answers podRentInterruptable
    await admin(sim, "POST", "/_sim/settings", {"interruptible": True})
    await admin(sim, "POST", "/_sim/prices", {"gpu_type": "NVIDIA H100 80GB HBM3", "secure_spot": 2.79})
    adapter = make_adapter(api="graphql", interruptible=True)
    offer = pick(await adapter.offers(), "H100-SXM", "EU-RO-1", CapacityType.SPOT)
    # the default adapter refuses a spot offer outright (RunPod has none)
    with pytest.raises(PermanentError, match="interruptible"):
        await make_adapter().launch(request(offer, name="gpuhop-nospot-1"))
    inst = await adapter.launch(request(offer))
    pod = sim.world.pods[inst.instance_id]
    assert pod.interruptible and pod.cost_per_hr == pytest.approx(2.79)
    [listed] = await adapter.list_instances()
    assert listed.extra["pod_type"] == "INTERRUPTABLE" and listed.region == "EU-RO-1"
    await admin(sim, "POST", f"/_sim/pods/{inst.instance_id}/preempt", {"wait": True})
    [taken] = await adapter.list_instances()
    assert taken.state == InstanceState.PREEMPTED and taken.reason.startswith("Outbid: ")
    await adapter.terminate(inst.instance_id)


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
    c = await adapter.launch(request(offer, name="gpuhop-c-1", script="import time; time.sleep(60)"))
    await admin(sim, "POST", f"/_sim/pods/{a.instance_id}/preempt", {"wait": True})
    await asyncio.to_thread(runpod.stop_pod, b.instance_id)
    await wait_until(lambda: sim.world.pods[c.instance_id].started_at)
    await admin(sim, "POST", f"/_sim/pods/{c.instance_id}/preempt", {"wait": True, "cause": "runpod"})
    by_name = {i.name: i for i in await adapter.list_instances()}
    assert by_name["gpuhop-a-1"].state == InstanceState.PREEMPTED  # its host went away
    assert "Machine offline" in by_name["gpuhop-a-1"].reason
    assert by_name["gpuhop-b-1"].state == InstanceState.EXITED
    assert by_name["gpuhop-c-1"].state == InstanceState.EXITED  # e.g. insufficient balance
    assert "Exited by Runpod" in by_name["gpuhop-c-1"].reason
    assert by_name["gpuhop-a-1"].region == "US-TX-3"
    assert by_name["gpuhop-a-1"].price_per_hour == pytest.approx(0.69)

    await adapter.terminate(a.instance_id)
    await adapter.terminate(c.instance_id)
    assert {i.name for i in await adapter.list_instances()} == {"gpuhop-b-1"}
    await asyncio.to_thread(runpod.terminate_pod, foreign["id"])


def test_status_table() -> None:
    def pod(status: str, runtime: Any = None, change: str = "") -> dict[str, Any]:
        return {"desiredStatus": status, "runtime": runtime, "lastStatusChange": change}

    assert pod_state(pod("RUNNING")) == InstanceState.PENDING
    assert pod_state(pod("RUNNING", {"uptimeInSeconds": 3})) == InstanceState.RUNNING
    assert pod_state(pod("EXITED", change="Outbid: Mon Jan 05 2026")) == InstanceState.PREEMPTED
    # RunPod's own stops (image, size, balance) are not reclaims (PROVIDERS.md, late 2026)
    for change in ("Exited by Runpod: Mon", "exited by RunPod: x", "EXITED BY RUN POD"):
        assert pod_state(pod("EXITED", change=change)) == InstanceState.EXITED
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
        await adapter.launch(request(pick(offers, "L40S", "RO", volumes=False), name="gpuhop-job1-2"))
    assert await sim_pods(sim) == []
    # the cached listing promised what is gone: the next one asks RunPod again and shows none, so
    # placement stops choosing it (and a job that may move does) before offer_ttl_seconds pass
    assert not [o for o in await adapter.offers() if o.available > 0]


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
        with pytest.raises(RetryLater):
            await adapter.list_instances()
        assert sim.calls - calls == 3  # retry_attempts, then give up
        await admin(sim, "POST", "/_sim/faults", {"clear": True})


async def test_an_echoed_key_is_redacted(
    sim: RunPodSimulator, adapter: RunPodAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # the error page and the GraphQL error repeat the request's Authorization header
    await admin(sim, "POST", "/_sim/faults", {"kind": "500", "count": 50, "echo": True})
    with pytest.raises(RetryLater) as transient:
        await adapter.list_instances()
    await admin(sim, "DELETE", "/_sim/faults")
    await admin(sim, "POST", "/_sim/faults", {"kind": "graphql", "count": 1, "echo": True,
                                              "message": "Invalid input."})
    with pytest.raises(PermanentError) as permanent:
        await adapter.list_instances()
    for exc in (transient.value, permanent.value):
        # the echo reached the message (so the key was there to leak) and the key did not
        assert "Bearer ***" in str(exc) and API_KEY not in str(exc) and API_KEY not in repr(exc)
    assert "retrying" in caplog.text and API_KEY not in caplog.text


async def test_timeouts_are_bounded_and_leave_nothing_running(
    sim: RunPodSimulator, make_adapter: Callable[..., RunPodAdapter]
) -> None:
    a = make_adapter(request_timeout_seconds=0.3, retry_attempts=2, retry_budget_seconds=2.0)
    await a.start()
    threads = threading.active_count()
    # RunPod hangs for an hour: the adapter must give up by itself (the test only guards
    # against a hang with a deadline far beyond any budget)
    await admin(sim, "POST", "/_sim/faults", {"kind": "timeout", "count": 5, "seconds": 3600})
    with pytest.raises(RetryLater):
        await asyncio.wait_for(a.offers(), timeout=120)
    # no request was left behind in a thread (the SDK in asyncio.to_thread would have)
    assert threading.active_count() <= threads
    await admin(sim, "DELETE", "/_sim/faults")
    assert await a.offers()


@pytest.mark.parametrize(("api", "create_op"), [("rest", "createPod"), ("graphql", "podFindAndDeployOnDemand")])
async def test_a_slow_create_makes_exactly_one_pod(
    sim: RunPodSimulator, make_adapter: Callable[..., RunPodAdapter], api: str, create_op: str
) -> None:
    a = make_adapter(api=api, request_timeout_seconds=0.5, retry_attempts=2, retry_budget_seconds=1.5)
    offer = pick(await a.offers(), "RTX-4090", "US-TX-3", volumes=True)
    # the create is answered after the adapter's request timeout, and still carried out
    await admin(sim, "POST", "/_sim/latency", {"operation": create_op, "seconds": 2.5})
    outcomes: list[str] = []

    async def launched() -> Any:
        try:
            return await a.launch(request(offer, name="gpuhop-slow-1"))
        except RetryLater as exc:  # what the engine sees, and retries later
            outcomes.append(str(exc))
            return None

    inst = await wait_until(launched, within=60)
    assert outcomes, "the first create should have timed out"
    # every create sent has been carried out by now; more launches change nothing
    await wait_until(lambda: not sim._delayed, within=60)
    for _ in range(3):
        assert (await a.launch(request(offer, name="gpuhop-slow-1"))).instance_id == inst.instance_id
    pods = [p for p in await sim_pods(sim) if p["name"] == "gpuhop-slow-1"]
    assert [p["id"] for p in pods] == [inst.instance_id]
    ledger = await admin(sim, "GET", "/_sim/ledger")
    assert [e["id"] for e in ledger["entries"] if e["owner"] == "gpuhop-slow-1"] == [inst.instance_id]
    await admin(sim, "DELETE", "/_sim/latency")
    await a.terminate(inst.instance_id)


async def test_duplicates_are_listed_and_never_added_to(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick(await adapter.offers(), "RTX-4090", "US-TX-3", volumes=True)
    first = await asyncio.to_thread(runpod.create_pod, "gpuhop-dup-1", "img", "NVIDIA GeForce RTX 4090",
                                    cloud_type="SECURE", data_center_id="US-TX-3")
    second = await asyncio.to_thread(runpod.create_pod, "gpuhop-dup-1", "img", "NVIDIA GeForce RTX 4090",
                                     cloud_type="SECURE", data_center_id="US-TX-3")
    listed = [i for i in await adapter.list_instances() if i.name == "gpuhop-dup-1"]
    assert sorted(i.instance_id for i in listed) == sorted([first["id"], second["id"]])
    await asyncio.to_thread(runpod.stop_pod, first["id"])  # an EXITED pod of that name counts too
    got = await adapter.launch(request(offer, name="gpuhop-dup-1"))
    assert got.instance_id == second["id"]
    await asyncio.to_thread(runpod.terminate_pod, second["id"])
    assert (await adapter.launch(request(offer, name="gpuhop-dup-1"))).instance_id == first["id"]
    assert len([p for p in await sim_pods(sim) if p["name"] == "gpuhop-dup-1"]) == 2


async def test_final_bill_is_the_ledgers_charge(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offers = await adapter.offers()
    running = await adapter.launch(request(pick(offers, "H100-SXM", "EU-RO-1", count=2),
                                           name="gpuhop-bill-1", script="import time; time.sleep(600)"))
    taken = await adapter.launch(request(pick(offers, "RTX-4090", "RO", volumes=False),
                                         name="gpuhop-bill-2", script="import time; time.sleep(600)"))

    async def billed_for(seconds: float) -> bool:
        bills = [i.bill for i in await adapter.list_instances()]
        return all(b is not None and b.ended_at is None and b.cost_usd > 0 for b in bills) and all(
            time.time() - b.started_at >= seconds for b in bills if b is not None)

    await wait_until(lambda: billed_for(3), within=60)
    [live] = [i for i in await adapter.list_instances() if i.instance_id == running.instance_id]
    assert live.bill is not None and live.bill.started_at == sim.world.pods[running.instance_id].last_started_at
    await admin(sim, "POST", f"/_sim/pods/{taken.instance_id}/preempt", {"wait": True})
    [gone] = [i for i in await adapter.list_instances() if i.instance_id == taken.instance_id]
    assert gone.state == InstanceState.PREEMPTED and gone.reason.startswith("Machine offline: ")
    assert gone.bill is not None and gone.bill.ended_at is not None

    bills = {i: await adapter.terminate(i) for i in (running.instance_id, taken.instance_id)}
    ledger = {e["id"]: e for e in (await admin(sim, "GET", "/_sim/ledger"))["entries"] if e["kind"] == "pod"}
    for pod_id, bill in bills.items():
        entry = ledger[pod_id]
        assert bill is not None and not entry["running"]
        assert (bill.started_at, bill.ended_at) == (entry["started"], entry["stopped"])
        assert bill.cost_usd == pytest.approx(entry["cost_usd"], rel=0.01)
        assert bill.cost_usd >= 3 * entry["price_per_hour"] / 3600 * 0.99
    # the preempted pod stopped billing when RunPod took it, not when gpuhop noticed
    final = bills[taken.instance_id]
    assert final is not None and final.ended_at == gone.bill.ended_at
    assert await adapter.terminate(running.instance_id) is None  # already gone: nothing to tell


async def test_other_graphql_errors_are_permanent(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    await admin(sim, "POST", "/_sim/faults", {"kind": "graphql", "count": 1, "message": "Invalid input."})
    with pytest.raises(PermanentError) as info:
        await adapter.list_instances()
    assert not isinstance(info.value, AuthError) and "Invalid input." in str(info.value)


async def test_auth_errors(sim: RunPodSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           make_adapter: Callable[..., RunPodAdapter]) -> None:
    wrong = make_adapter(api_key="rpa_WRONG_KEY_123")
    with pytest.raises(AuthError) as info:
        await wrong.offers()
    assert "rpa_WRONG_KEY_123" not in str(info.value) and "rpa_WRONG_KEY_123" not in repr(wrong.client)
    ctx = AdapterContext("gpuhop", tmp_path, tmp_path, "http://127.0.0.1:9")
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    # a missing key is a configuration mistake, caught where the table is validated
    with pytest.raises(ValidationError, match="RUNPOD_API_KEY"):
        RunPodSettings(api_url=sim.url)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    from_env = RunPodAdapter(RunPodSettings(api_url=sim.url), ctx)
    assert await from_env.list_instances() == []
    await from_env.close()
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
