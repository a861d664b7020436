"""RunPod as it is in late 2026 (PROVIDERS.md corrections), against the stricter simulator, over
both transports (REST v2, the default, and GraphQL): on-demand offers only (Secure by data center,
Community by country), "Exited by RunPod" read as the fault it is (image, balance) while a host
that goes away stays a preemption, minCudaVersion sent, the start command that replaces an
image's ENTRYPOINT, and the REST door's own rules (unknown fields refused, problem+json, 429
with Retry-After and RateLimit headers, one world for both doors)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.runpod import RunPodAdapter, RunPodSettings
from orchestrator.models import CapacityType, InstanceFault, InstanceState, LaunchRequest, Offer
from simulators.runpod import RunPodSimulator
from tests.runpod_fixtures import (
    API_KEY,
    adapter_for,
    admin,
    no_process_left,
    running_sim,
    wait_until,
)

APIS = ["rest", "graphql"]


@pytest.fixture
async def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunPodSimulator]:
    async with running_sim(tmp_path, monkeypatch) as s:
        yield s


@pytest.fixture(params=APIS)
async def adapter(request: pytest.FixtureRequest, sim: RunPodSimulator, tmp_path: Path) -> AsyncIterator[RunPodAdapter]:
    overrides: dict[str, Any] = {}
    if "api" in RunPodSettings.model_fields:
        overrides["api"] = request.param
    elif request.param != "graphql":
        pytest.fail("the adapter has no REST transport (api setting)")
    a = adapter_for(sim, tmp_path, **overrides)
    await a.start()
    try:
        yield a
    finally:
        for inst in await a.list_instances():
            await a.terminate(inst.instance_id)
        await wait_until(lambda: no_process_left(sim))
        await a.close()


def pick(offers: list[Offer], gpu: str, region: str, count: int = 1) -> Offer:
    for o in offers:
        if (o.gpu, o.region, o.gpu_count) == (gpu, region, count):
            return o
    raise AssertionError(f"no offer {gpu} in {region} x{count}: {sorted({(o.gpu, o.region) for o in offers})}")


def request(offer: Offer, name: str, command: list[str], image: str = "python:3.11-slim",
            min_cuda: str | None = None) -> LaunchRequest:
    return LaunchRequest(
        name=name, idempotency_key=f"{name}:{offer.offer_id}", job_id="job1", attempt=1, offer=offer,
        image=image, command=command, env={"GPUHOP_JOB_ID": "job1", "GPUHOP_ATTEMPT": "1"},
        disk_gb=20, min_cuda=min_cuda,
    )


SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


async def instance(a: RunPodAdapter, instance_id: str, check: Callable[[Any], bool]) -> Any:
    async def found() -> Any:
        for i in await a.list_instances():
            if i.instance_id == instance_id and check(i):
                return i
        return None

    return await wait_until(found, within=20)


# ------------------------------------------------------------------ 1 + 4: offers


async def test_offers_are_on_demand_secure_by_data_center_community_by_country(adapter: RunPodAdapter) -> None:
    offers = await adapter.offers()
    assert offers and all(o.capacity == CapacityType.ON_DEMAND for o in offers)
    secure = [o for o in offers if o.supports_volumes]
    community = [o for o in offers if not o.supports_volumes]
    assert {o.region for o in secure} == {"US-TX-3", "EU-RO-1", "CA-MTL-1"}
    assert {o.region for o in community} == {"US", "RO", "CA"}  # countries, never data centers
    assert pick(community, "RTX-4090", "US").price_per_hour == pytest.approx(0.34)
    assert pick(secure, "RTX-4090", "US-TX-3").price_per_hour == pytest.approx(0.69)


async def test_community_launches_by_country_and_lands_there(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick([o for o in await adapter.offers() if not o.supports_volumes], "RTX-4090", "RO")
    inst = await adapter.launch(request(offer, "gpuhop-comm-1", SLEEP))
    pod = sim.world.pods[inst.instance_id]
    assert (pod.cloud, pod.country) == ("COMMUNITY", "RO") and inst.region == "RO"
    listed = await instance(adapter, inst.instance_id, lambda i: True)
    assert listed.region == "RO"


async def test_interruptible_only_when_opted_in(sim: RunPodSimulator, make: Callable[..., RunPodAdapter]) -> None:
    await admin(sim, "POST", "/_sim/settings", {"interruptible": True})
    await admin(sim, "POST", "/_sim/prices", {"gpu_type": "NVIDIA RTX A6000", "secure_spot": 0.232})
    default = make(api="graphql")
    assert not [o for o in await default.offers() if o.capacity == CapacityType.SPOT]
    opted = make(api="graphql", interruptible=True)
    spot = [o for o in await opted.offers() if o.capacity == CapacityType.SPOT]
    assert spot and {o.gpu for o in spot} == {"RTX-A6000"}


@pytest.fixture
async def make(sim: RunPodSimulator, tmp_path: Path) -> AsyncIterator[Callable[..., RunPodAdapter]]:
    made: list[RunPodAdapter] = []

    def build(**overrides: Any) -> RunPodAdapter:
        made.append(adapter_for(sim, tmp_path, **overrides))
        return made[-1]

    yield build
    for a in made:
        await a.close()


# ------------------------------------------------------------------ 3: "Exited by RunPod" is a fault


@pytest.mark.parametrize("pull", ["missing", "too_large"])
async def test_an_image_runpod_cannot_run_is_an_image_fault(
    sim: RunPodSimulator, adapter: RunPodAdapter, pull: str
) -> None:
    await admin(sim, "POST", "/_sim/images", {"image": "ghcr.io/acme/private:1", "pull": pull})
    offer = pick(await adapter.offers(), "RTX-4090", "US-TX-3")
    inst = await adapter.launch(request(offer, "gpuhop-img-1", SLEEP, image="ghcr.io/acme/private:1"))
    ended = await instance(adapter, inst.instance_id, lambda i: i.state != InstanceState.PENDING)
    assert ended.state == InstanceState.EXITED and ended.fault == InstanceFault.IMAGE
    assert "ghcr.io/acme/private:1" in ended.reason  # RunPod's own words


async def test_insufficient_balance_is_an_account_fault(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick(await adapter.offers(), "RTX-4090", "US-TX-3")
    inst = await adapter.launch(request(offer, "gpuhop-broke-1", SLEEP))
    await instance(adapter, inst.instance_id, lambda i: i.state == InstanceState.RUNNING)
    await admin(sim, "POST", "/_sim/account", {"balance": 0})
    ended = await instance(adapter, inst.instance_id, lambda i: i.state != InstanceState.RUNNING)
    assert ended.state == InstanceState.EXITED and ended.fault == InstanceFault.ACCOUNT
    assert "Insufficient balance" in ended.reason
    assert ended.bill is not None and ended.bill.ended_at is not None


async def test_a_host_that_goes_away_is_a_preemption(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick([o for o in await adapter.offers() if not o.supports_volumes], "RTX-4090", "US")
    inst = await adapter.launch(request(offer, "gpuhop-host-1", SLEEP))
    await instance(adapter, inst.instance_id, lambda i: i.state == InstanceState.RUNNING)
    await admin(sim, "POST", f"/_sim/pods/{inst.instance_id}/preempt", {"wait": True})
    ended = await instance(adapter, inst.instance_id, lambda i: i.state != InstanceState.RUNNING)
    assert ended.state == InstanceState.PREEMPTED and ended.fault is None


# ------------------------------------------------------------------ 5: host CUDA


DUMP_CUDA = [sys.executable, "-c",
             "import os; open(os.path.join(os.environ['GPUHOP_VOLUME'], 'cuda'), 'w')"
             ".write(os.environ.get('CUDA_DRIVER_VERSION', '?'))"]


async def test_min_cuda_keeps_the_pod_off_old_hosts(sim: RunPodSimulator, adapter: RunPodAdapter) -> None:
    offer = pick(await adapter.offers(), "RTX-4090", "US-TX-3")
    assert offer.max_cuda in (None, "12.8")
    new = await adapter.launch(request(offer, "gpuhop-cuda-1", DUMP_CUDA, min_cuda="12.4"))
    old = await adapter.launch(request(offer, "gpuhop-cuda-2", DUMP_CUDA))
    assert sim.world.pods[new.instance_id].host_cuda == "12.8"
    assert sim.world.pods[old.instance_id].host_cuda == "11.8"  # without the filter: an old host
    out = sim.runtime.volume_dir(f"pod-{new.instance_id}") / "cuda"
    # the job opens the file before it writes it: wait for what it wrote, not for the name
    await wait_until(lambda: out.exists() and out.read_text(), within=20)
    assert out.read_text() == "12.8"


# ------------------------------------------------------------------ 6: the start command


async def test_the_job_runs_as_given_on_an_image_with_an_entrypoint(
    sim: RunPodSimulator, adapter: RunPodAdapter
) -> None:
    hostile = ['a "quoted" arg', "$HOME `id` $(id)", "new\nline", "-m", "vllm.entrypoints", "'", "", "ünï 🚀"]
    script = ("import json, os, sys; open(os.path.join(os.environ['GPUHOP_VOLUME'], 'argv.json'), 'w')"
              ".write(json.dumps(sys.argv[1:]))")
    offer = pick(await adapter.offers(), "RTX-4090", "US-TX-3")
    inst = await adapter.launch(request(offer, "gpuhop-vllm-1", [sys.executable, "-c", script, *hostile],
                                        image="vllm/vllm-openai:v0.6.3"))
    out = sim.runtime.volume_dir(f"pod-{inst.instance_id}") / "argv.json"
    await wait_until(lambda: out.exists() and out.read_text(), within=20)
    assert json.loads(out.read_text()) == hostile


# ------------------------------------------------------------------ 7: timeouts


def test_timeouts_follow_runpods() -> None:
    s = RunPodSettings(api_key="k")
    assert s.request_timeout_seconds >= 20 and s.retry_budget_seconds >= 45  # the SDK allows 30 s per request
    assert s.retry_budget_seconds > s.request_timeout_seconds  # a launch (lookup + create) fits


# ------------------------------------------------------------------ 2: the REST door


async def rest_call(sim: RunPodSimulator, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{sim.url}{path}", json=body,
                             headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def test_rest_refuses_unknown_fields_with_problem_json(sim: RunPodSimulator) -> None:
    body = {"name": "x", "image": "img", "gpu": {"typeIds": ["NVIDIA GeForce RTX 4090"], "count": 1},
            "cloudType": "SECURE", "interruptible": True}
    status, headers, problem = await rest_call(sim, "POST", "/v2/pods", body)
    assert status == 400 and headers["Content-Type"].startswith("application/problem+json")
    assert set(problem) == {"type", "title", "status", "detail"} and "interruptible" in problem["detail"]
    assert not sim.world.pods
    # Community Cloud pinned to a data center: RunPod's no-capacity words
    pinned = {k: v for k, v in body.items() if k != "interruptible"} | {
        "cloudType": "COMMUNITY", "dataCenterIds": ["US-TX-3"]}
    status, _, problem = await rest_call(sim, "POST", "/v2/pods", pinned)
    assert status == 400 and "no longer any instances available" in problem["detail"]
    await admin(sim, "POST", "/_sim/faults", {"kind": "429", "count": 1})
    status, headers, problem = await rest_call(sim, "GET", "/v2/pods")
    assert status == 429 and headers["Retry-After"] == "1" and "RateLimit-Remaining" in headers
    assert problem["status"] == 429


async def test_one_world_for_both_doors(sim: RunPodSimulator, make: Callable[..., RunPodAdapter]) -> None:
    rest, gql = make(api="rest"), make(api="graphql")
    offer = pick(await rest.offers(), "RTX-4090", "US-TX-3")
    made = await rest.launch(request(offer, "gpuhop-both-1", SLEEP))
    assert made.instance_id in {i.instance_id for i in await gql.list_instances()}
    await gql.terminate(made.instance_id)
    assert made.instance_id not in {i.instance_id for i in await rest.list_instances()}
    assert "GPU types" in await rest.verify() and "GPU types" in await gql.verify()
