"""The RunPod simulator against the real `runpod` SDK: its helpers must work unchanged, and the
simulator must fail, preempt and bill the way PROVIDERS.md says RunPod does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import runpod
from runpod.api.graphql import run_graphql_query
from runpod.error import AuthenticationError, QueryError

from simulators.runpod import NO_CAPACITY, NO_CAPACITY_SPOT, RunPodSimulator
from simulators.runpod.world import INTERRUPTIBLE_GONE
from tests.runpod_fixtures import (
    API_KEY,
    NOTICE,
    admin,
    no_process_left,
    running_sim,
    sim_pods,
    wait_until,
)

GPU = "NVIDIA GeForce RTX 4090"


@pytest.fixture
async def runpod_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunPodSimulator]:
    async with running_sim(tmp_path, monkeypatch) as sim:
        yield sim


def sdk(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return asyncio.to_thread(fn, *args, **kwargs)


async def gql(sim: RunPodSimulator, query: str, variables: dict[str, Any] | None = None,
              key: str = API_KEY) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sim.url}/graphql", json={"query": query, "variables": variables},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_sdk_helpers_work_unchanged(runpod_sim: RunPodSimulator) -> None:
    gpus = await sdk(runpod.get_gpus)
    assert {"id": GPU, "displayName": "RTX 4090", "memoryInGb": 24} in gpus
    gpu = await sdk(runpod.get_gpu, GPU)
    assert gpu["securePrice"] == 0.69 and gpu["communityPrice"] == 0.34
    assert gpu["lowestPrice"]["uninterruptablePrice"] == 0.34
    with pytest.raises(ValueError):
        await sdk(runpod.get_gpu, "NVIDIA Imaginary 9000")

    free_before = runpod_sim.world.catalog.free("US-TX-3", GPU, "SECURE")
    created = await sdk(
        runpod.create_pod, "sdk-pod", "python:3.11-slim", GPU, cloud_type="SECURE",
        data_center_id="US-TX-3", gpu_count=2,
        docker_args="echo $GREETING > $GPUHOP_VOLUME/out.txt; exec sleep 60",
        env={"GREETING": "hello pod"},
    )
    pod_id = created["id"]
    assert created["env"] == ["GREETING=hello pod"]
    assert runpod_sim.world.catalog.free("US-TX-3", GPU, "SECURE") == free_before - 2

    pod = await sdk(runpod.get_pod, pod_id)
    assert pod["desiredStatus"] == "RUNNING" and pod["runtime"] is None  # container not up yet
    assert pod["costPerHr"] == pytest.approx(1.38)

    async def up() -> bool:
        return bool((await sdk(runpod.get_pod, pod_id))["runtime"])

    await wait_until(up)
    out = runpod_sim.runtime.volume_dir(f"pod-{pod_id}") / "out.txt"
    await wait_until(lambda: out.exists() and out.read_text())  # written, not just created
    assert out.read_text() == "hello pod\n"
    pods = await sdk(runpod.get_pods)
    assert [p["id"] for p in pods] == [pod_id]
    assert pods[0]["lastStatusChange"].startswith("Rented by User: ")

    stopped = await sdk(runpod.stop_pod, pod_id)
    assert stopped == {"id": pod_id, "desiredStatus": "EXITED"}
    assert runpod_sim.world.catalog.free("US-TX-3", GPU, "SECURE") == free_before
    await wait_until(lambda: not runpod_sim.runtime.running(pod_id))

    resumed = await sdk(runpod.resume_pod, pod_id, 2)
    assert resumed["desiredStatus"] == "RUNNING"
    await wait_until(lambda: runpod_sim.runtime.running(pod_id))

    assert await sdk(runpod.terminate_pod, pod_id) is None
    assert await sdk(runpod.get_pod, pod_id) is None
    assert await sdk(runpod.get_pods) == []
    assert runpod_sim.world.catalog.free("US-TX-3", GPU, "SECURE") == free_before
    await wait_until(lambda: no_process_left(runpod_sim))
    [row] = await sim_pods(runpod_sim)
    assert row["desiredStatus"] == "TERMINATED" and not row["processRunning"]


async def test_variables_and_offer_queries(runpod_sim: RunPodSimulator) -> None:
    # RunPod's Go CLI style: $variables, an operation name, an input object variable
    status, body = await gql(
        runpod_sim,
        """query Offers($id: String, $dc: String) {
             gpuTypes(input: {id: $id}) { id maxGpuCount
               lowestPrice(input: {gpuCount: 1, dataCenterId: $dc, secureCloud: true}) {
                 minimumBidPrice uninterruptablePrice stockStatus maxUnreservedGpuCount availableGpuCounts } }
             dataCenters { id name location gpuAvailability { gpuTypeId stockStatus } } }""",
        {"id": "NVIDIA H100 80GB HBM3", "dc": "EU-RO-1"},
    )
    assert status == 200, body
    [h100] = body["data"]["gpuTypes"]
    assert h100["lowestPrice"] == {  # no bid price: RunPod has no spot since September 2026
        "minimumBidPrice": None, "uninterruptablePrice": 2.99, "stockStatus": "High",
        "maxUnreservedGpuCount": 8, "availableGpuCounts": [1, 2, 3, 4, 5, 6, 7, 8],
    }
    dcs = {d["id"]: d for d in body["data"]["dataCenters"]}
    assert {"US-TX-3", "EU-RO-1", "CA-MTL-1"} <= set(dcs)
    deploy = ("mutation Deploy($input: PodFindAndDeployOnDemandInput!) { podFindAndDeployOnDemand(input: $input) "
              "{ id desiredStatus podType machine { location dataCenterId } } }")
    community = {"name": "cli", "imageName": "x", "gpuTypeId": GPU, "cloudType": "COMMUNITY",
                 "gpuCount": 1, "env": [{"key": "A", "value": "b"}]}
    # Community Cloud cannot be pinned to a data center: RunPod finds nothing
    status, body = await gql(runpod_sim, deploy, {"input": {**community, "dataCenterId": "EU-RO-1"}})
    assert status == 200 and body["errors"][0]["message"] == NO_CAPACITY, body
    # it is chosen by country code
    status, body = await gql(runpod_sim, deploy, {"input": {**community, "countryCode": "RO"}})
    assert status == 200, body
    pod = body["data"]["podFindAndDeployOnDemand"]
    assert pod["desiredStatus"] == "RUNNING" and pod["machine"] == {"location": "RO", "dataCenterId": None}
    assert runpod_sim.world.pods[pod["id"]].data_center == "EU-RO-1"
    # a malformed query is a GraphQL error, not a crash
    status, body = await gql(runpod_sim, "query { gpuTypes { id nonsenseField } }")
    assert status == 400 and "nonsenseField" in body["errors"][0]["message"]


async def test_bad_key_is_401(runpod_sim: RunPodSimulator) -> None:
    with pytest.raises(AuthenticationError):
        await sdk(runpod.get_gpus, api_key="rpa_WRONG")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{runpod_sim.url}/graphql", json={"query": "{ myself { id } }"}) as resp:
            assert resp.status == 401


async def test_no_capacity(runpod_sim: RunPodSimulator) -> None:
    await admin(runpod_sim, "POST", "/_sim/capacity", {"gpu_type": GPU, "count": 0})
    with pytest.raises(QueryError) as info:
        await sdk(runpod.create_pod, "full", "img", GPU)
    assert str(info.value) == NO_CAPACITY
    gpu = await sdk(runpod.get_gpu, GPU)
    assert gpu["lowestPrice"]["uninterruptablePrice"] is None
    # spot is gone (September 2026): podRentInterruptable is refused whatever the market
    spot = ('mutation { podRentInterruptable(input: {bidPerGpu: 0.3, name: "s", imageName: "i", '
            'gpuTypeId: "NVIDIA RTX A6000", cloudType: SECURE, gpuCount: 1}) { id } }')
    with pytest.raises(QueryError) as info:
        await sdk(run_graphql_query, spot)
    assert str(info.value) == INTERRUPTIBLE_GONE
    # opted back in (the past, for the interruptible setting): an empty A6000 market
    await admin(runpod_sim, "POST", "/_sim/settings", {"interruptible": True})
    await admin(runpod_sim, "POST", "/_sim/prices", {"gpu_type": "NVIDIA RTX A6000", "secure_spot": 0.232})
    await admin(runpod_sim, "POST", "/_sim/capacity", {"gpu_type": "NVIDIA RTX A6000", "count": 0})
    with pytest.raises(QueryError) as info:
        await sdk(run_graphql_query, spot)
    assert str(info.value) == NO_CAPACITY_SPOT
    assert not runpod_sim.world.pods


async def test_volume_must_be_in_the_pods_data_center(runpod_sim: RunPodSimulator) -> None:
    created = await sdk(
        run_graphql_query,
        'mutation { createNetworkVolume(input: {name: "ckpt", size: 10, dataCenterId: "EU-RO-1"}) '
        "{ id name size dataCenterId } }",
    )
    vol = created["data"]["createNetworkVolume"]
    assert vol["dataCenterId"] == "EU-RO-1"
    user = await sdk(runpod.get_user)
    assert user["networkVolumes"] == [vol]
    with pytest.raises(QueryError, match="EU-RO-1"):
        await sdk(runpod.create_pod, "wrong-dc", "img", GPU, data_center_id="US-TX-3",
                  network_volume_id=vol["id"])
    with pytest.raises(QueryError, match="Secure Cloud"):
        await sdk(runpod.create_pod, "community", "img", GPU, cloud_type="COMMUNITY",
                  network_volume_id=vol["id"])
    # without a data center the SDK looks the volume's up (get_user) and lands there
    pod = await sdk(runpod.create_pod, "right-dc", "img", GPU, network_volume_id=vol["id"],
                    docker_args="echo hi > $GPUHOP_VOLUME/hello; exec sleep 60")
    assert runpod_sim.world.pods[pod["id"]].data_center == "EU-RO-1"
    hello = runpod_sim.runtime.volume_dir(vol["id"]) / "hello"
    await wait_until(hello.exists)
    # an attached volume cannot be deleted; once the pod is gone it can
    delete = f'mutation {{ deleteNetworkVolume(input: {{id: "{vol["id"]}"}}) }}'
    with pytest.raises(QueryError, match="attached"):
        await sdk(run_graphql_query, delete)
    await sdk(runpod.terminate_pod, pod["id"])
    assert (await sdk(run_graphql_query, delete))["data"] == {"deleteNetworkVolume": None}


async def test_preempt_sigterm_then_sigkill(runpod_sim: RunPodSimulator) -> None:
    script = (
        "trap 'echo TERM >> $GPUHOP_VOLUME/signals' TERM; "
        "echo up > $GPUHOP_VOLUME/up; while true; do sleep 0.05; done"
    )
    pod = await sdk(runpod.create_pod, "victim", "img", "NVIDIA RTX A6000",
                    data_center_id="CA-MTL-1", cloud_type="SECURE", docker_args=script)
    pod_id = pod["id"]
    vol = runpod_sim.runtime.volume_dir(f"pod-{pod_id}")
    await wait_until((vol / "up").exists)
    free = runpod_sim.world.catalog.free("CA-MTL-1", "NVIDIA RTX A6000", "SECURE")

    started = time.monotonic()
    await admin(runpod_sim, "POST", f"/_sim/pods/{pod_id}/preempt", {"wait": True})
    elapsed = time.monotonic() - started
    assert elapsed >= NOTICE * 0.9  # the process ignored SIGTERM, so it lived out the notice
    assert (vol / "signals").read_text().startswith("TERM")
    machine = runpod_sim.runtime.machines[pod_id]
    assert machine.exit_code == -9 and machine.killed_by_provider

    got = await sdk(runpod.get_pod, pod_id)
    assert got["desiredStatus"] == "EXITED" and got["runtime"] is None
    # an on-demand pod is not outbid: its host went away (inferred words, see world.py)
    assert got["lastStatusChange"].startswith("Machine offline: ")
    assert runpod_sim.world.catalog.free("CA-MTL-1", "NVIDIA RTX A6000", "SECURE") == free + 1
    ledger = await admin(runpod_sim, "GET", "/_sim/ledger")
    [entry] = [e for e in ledger["entries"] if e["id"] == pod_id]
    assert not entry["running"]
    await asyncio.sleep(2 * 0.2)  # a preempted container is not restarted
    assert not runpod_sim.runtime.running(pod_id)

    # a per-request notice, and a process that leaves on SIGTERM: no need to wait it out
    pod2 = await sdk(runpod.create_pod, "polite", "img", GPU, docker_args="exec sleep 60")
    await wait_until(lambda: runpod_sim.runtime.running(pod2["id"]))
    started = time.monotonic()
    await admin(runpod_sim, "POST", f"/_sim/pods/{pod2['id']}/preempt", {"notice_seconds": 5, "wait": True})
    assert time.monotonic() - started < 3
    assert runpod_sim.runtime.machines[pod2["id"]].exit_code == -15

    # without "wait" the admin call returns at once and the pod exits after the notice
    await sdk(runpod.resume_pod, pod2["id"], 1)
    await wait_until(lambda: runpod_sim.runtime.running(pod2["id"]))
    await admin(runpod_sim, "POST", f"/_sim/pods/{pod2['id']}/preempt", {})

    async def exited() -> bool:
        return bool((await sdk(runpod.get_pod, pod2["id"]))["desiredStatus"] == "EXITED")

    await wait_until(exited)


async def test_container_restarts_when_its_process_exits(runpod_sim: RunPodSimulator) -> None:
    pod = await sdk(runpod.create_pod, "flappy", "img", GPU, docker_args="echo run >> $GPUHOP_VOLUME/runs")
    runs = runpod_sim.runtime.volume_dir(f"pod-{pod['id']}") / "runs"
    await wait_until(lambda: runs.exists() and runs.read_text().count("run") >= 3)
    assert runpod_sim.world.pods[pod["id"]].restarts >= 2
    assert (await sdk(runpod.get_pod, pod["id"]))["desiredStatus"] == "RUNNING"


async def test_ledger_bills_pods_and_volumes(runpod_sim: RunPodSimulator) -> None:
    t0 = int(time.time())
    pod = await sdk(runpod.create_pod, "billed", "img", "NVIDIA H100 80GB HBM3", gpu_count=2,
                    docker_args="exec sleep 60")
    await sdk(run_graphql_query, 'mutation { createNetworkVolume(input: {name: "v", size: 100, '
                                 'dataCenterId: "US-TX-3"}) { id } }')
    # run across at least one second boundary of the simulator's clock
    await wait_until(lambda: int(time.time()) >= t0 + 2)
    stop = (f'mutation {{ podStop(input: {{podId: "{pod["id"]}"}}) '
            "{ id desiredStatus lastStatusChange lastStartedAt costPerHr } }")
    stopped = (await sdk(run_graphql_query, stop))["data"]["podStop"]
    await sdk(runpod.terminate_pod, pod["id"])
    t1 = time.time()
    ledger = await admin(runpod_sim, "GET", "/_sim/ledger")
    by_kind = {e["kind"]: e for e in ledger["entries"]}
    pod_entry, vol_entry = by_kind["pod"], by_kind["volume"]
    assert pod_entry["price_per_hour"] == pytest.approx(2 * 2.99) == stopped["costPerHr"]
    assert not pod_entry["running"]
    # one billing rule: costPerHr per second from lastStartedAt to the date the pod stopped,
    # both whole seconds, exactly as the API states them
    started = datetime.fromisoformat(stopped["lastStartedAt"].replace("Z", "+00:00")).timestamp()
    assert stopped["lastStatusChange"].startswith("Exited by user: ")
    ended = datetime.strptime(stopped["lastStatusChange"][len("Exited by user: "):][:33],
                              "%a %b %d %Y %H:%M:%S GMT%z").timestamp()
    assert (pod_entry["started"], pod_entry["stopped"]) == (started, ended)
    assert t0 <= started < ended <= t1
    assert pod_entry["cost_usd"] == pytest.approx((ended - started) * 5.98 / 3600, abs=1e-6)
    assert pod_entry["cost_usd"] > 0
    # terminating a stopped pod bills nothing more
    assert (await admin(runpod_sim, "GET", "/_sim/ledger"))["entries"][0]["cost_usd"] == pod_entry["cost_usd"]
    assert vol_entry["running"] and vol_entry["price_per_hour"] == pytest.approx(100 * 0.07 / 730)
    assert ledger["total_usd"] >= pod_entry["cost_usd"]


async def test_latency_delays_an_operation_which_still_happens_after_the_client_left(
    runpod_sim: RunPodSimulator,
) -> None:
    await admin(runpod_sim, "POST", "/_sim/latency", {"operation": "podFindAndDeployOnDemand", "seconds": 1.5})
    assert (await admin(runpod_sim, "GET", "/_sim/latency"))["latency"] == {"podFindAndDeployOnDemand": 1.5}
    deploy = ('mutation { podFindAndDeployOnDemand(input: {name: "slow", imageName: "i", '
              f'gpuTypeId: "{GPU}", cloudType: SECURE, gpuCount: 1}}) {{ id }} }}')
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(f"{runpod_sim.url}/graphql", json={"query": deploy},
                                    headers={"Authorization": f"Bearer {API_KEY}"},
                                    timeout=aiohttp.ClientTimeout(total=0.2)):
                pass
    # the client is gone; other operations are not delayed; the create still lands
    assert await sdk(runpod.get_pods) == []
    await wait_until(lambda: [p for p in runpod_sim.world.pods.values() if p.name == "slow"])
    assert runpod_sim.executed.count("podFindAndDeployOnDemand") == 1
    # "*" delays everything; DELETE clears one operation or all
    await admin(runpod_sim, "POST", "/_sim/latency", {"operation": "*", "seconds": 0.3})
    await admin(runpod_sim, "DELETE", "/_sim/latency?operation=podFindAndDeployOnDemand")
    assert (await admin(runpod_sim, "GET", "/_sim/latency"))["latency"] == {"*": 0.3}
    assert len(await sdk(runpod.get_pods)) == 1
    await admin(runpod_sim, "DELETE", "/_sim/latency")
    assert (await admin(runpod_sim, "GET", "/_sim/latency"))["latency"] == {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{runpod_sim.url}/_sim/latency", json={"operation": "x"}) as resp:
            assert resp.status == 400


async def test_faults(runpod_sim: RunPodSimulator) -> None:
    await admin(runpod_sim, "POST", "/_sim/faults", {"kind": "500", "count": 1})
    with pytest.raises(requests.exceptions.JSONDecodeError):
        await sdk(runpod.get_gpus)
    await admin(runpod_sim, "POST", "/_sim/faults", {"kind": "429", "count": 1})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{runpod_sim.url}/graphql", json={"query": "{ myself { id } }"},
                                headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            assert resp.status == 429
    await admin(runpod_sim, "POST", "/_sim/faults", {"kind": "graphql", "count": 1})
    with pytest.raises(QueryError, match="Something went wrong"):
        await sdk(runpod.get_gpus)
    assert len(await sdk(runpod.get_gpus)) > 0  # count=1 faults are used up

    await admin(runpod_sim, "POST", "/_sim/faults", {"kind": "timeout", "count": 1, "seconds": 2})
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(f"{runpod_sim.url}/graphql", json={"query": "{ myself { id } }"},
                                    headers={"Authorization": f"Bearer {API_KEY}"},
                                    timeout=aiohttp.ClientTimeout(total=0.3)):
                pass

    await admin(runpod_sim, "POST", "/_sim/faults", {"kind": "500", "rate": 1.0})
    for _ in range(3):
        with pytest.raises(requests.exceptions.RequestException):
            await sdk(runpod.get_gpus)
    await admin(runpod_sim, "POST", "/_sim/faults", {"clear": True})
    assert len(await sdk(runpod.get_gpus)) > 0

    # "echo": the error repeats the request's credentials, as a careless error page could
    await admin(runpod_sim, "POST", "/_sim/faults", {"kind": "graphql", "count": 1, "echo": True})
    with pytest.raises(QueryError, match=f"Bearer {API_KEY}"):
        await sdk(runpod.get_gpus)
    await admin(runpod_sim, "POST", "/_sim/faults", {"kind": "500", "count": 2})
    assert len((await admin(runpod_sim, "GET", "/_sim/faults"))["faults"]) == 1
    await admin(runpod_sim, "DELETE", "/_sim/faults")
    assert len(await sdk(runpod.get_gpus)) > 0


async def test_prices_and_admin_pods(runpod_sim: RunPodSimulator) -> None:
    await admin(runpod_sim, "POST", "/_sim/prices", {"gpu_type": GPU, "community": 0.29, "community_spot": 0.15})
    gpu = await sdk(runpod.get_gpu, GPU)
    assert gpu["communityPrice"] == 0.29 and gpu["lowestPrice"]["minimumBidPrice"] is None  # no spot
    await admin(runpod_sim, "POST", "/_sim/settings", {"interruptible": True})
    gpu = await sdk(runpod.get_gpu, GPU)
    assert gpu["lowestPrice"]["minimumBidPrice"] == 0.15 and gpu["communitySpotPrice"] == 0.15
    pod = await sdk(runpod.create_pod, "env", "img", GPU, env={"HF_TOKEN": "s3cret", "PLAIN": "ok"},
                    docker_args="exec sleep 60")
    [row] = await sim_pods(runpod_sim)
    assert row["id"] == pod["id"] and row["env"] == {"HF_TOKEN": "***", "PLAIN": "ok"}
    assert row["costPerHr"] == 0.29
