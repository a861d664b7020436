"""Helpers shared by the AWS simulator and adapter tests: a running simulator with short timings,
boto3 clients pointed at it (called off the event loop, since the simulator shares the loop),
the admin API, an adapter pointed at it and the clean-up that proves a test left nothing
behind, and polling with a deadline instead of fixed sleeps."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import boto3
from botocore.config import Config

from adapters.aws import AwsAdapter
from adapters.aws.settings import AwsSettings
from adapters.base import AdapterContext
from orchestrator.models import CapacityType, LaunchRequest, Offer, ProviderVolume, attempt_name
from simulators.aws import AwsSimulator

BOOT = 0.2
NOTICE = 1.0
GRACE = 0.5
PREFIX = "gh"
SLEEPER = ["python3", "-c", "import time; time.sleep(60)"]
T = TypeVar("T")


@asynccontextmanager
async def running_simulator(root: Path, **kwargs: Any) -> AsyncIterator[AwsSimulator]:
    options: dict[str, Any] = {"notice_seconds": NOTICE, "boot_delay": BOOT, "shutdown_grace": GRACE}
    options.update(kwargs)
    sim = AwsSimulator(root, **options)
    await sim.start()
    try:
        yield sim
    finally:
        machines = list(sim.runtime.machines.values())
        await sim.stop()
        left = [m.machine_id for m in machines if m.proc.returncode is None]
        assert not left, f"processes left behind: {left}"


def client(sim: AwsSimulator, service: str, region: str = "us-east-1") -> Any:
    return boto3.client(
        service,  # type: ignore[call-overload]
        endpoint_url=sim.url,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=30),
    )


async def call(fn: Callable[..., T], **kwargs: Any) -> T:
    """A boto3 call, off the event loop the simulator runs on."""
    return await asyncio.to_thread(fn, **kwargs)


async def admin(sim: AwsSimulator, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{sim.url}{path}", json=body) as resp:
            data = await resp.json(content_type=None)
            assert resp.status < 300, (resp.status, data)
            return data


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def wait_for(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Poll `probe` until `done(result)`, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s; last value: {value!r}")
        await asyncio.sleep(interval)


async def describe_instance(ec2: Any, instance_id: str) -> dict[str, Any]:
    answer = await call(ec2.describe_instances, InstanceIds=[instance_id])
    instance: dict[str, Any] = answer["Reservations"][0]["Instances"][0]
    return instance


def make_adapter(sim: AwsSimulator, tmp_path: Path, **overrides: Any) -> AwsAdapter:
    table: dict[str, Any] = {
        "regions": ["us-east-1", "us-west-2"], "endpoint_url": sim.url,
        "access_key_id": "testing", "secret_access_key": "testing",
        "retry_attempts": 3, "offers_ttl": 0,
    }
    table.update(overrides)
    ctx = AdapterContext(prefix=PREFIX, state_dir=tmp_path / "state", logs_dir=tmp_path / "logs", public_url="")
    return AwsAdapter(AwsSettings.model_validate(table), ctx)


async def clean_up(adapter: AwsAdapter, sim: AwsSimulator) -> None:
    """Terminate what the test made and delete its volumes, then prove nothing else is left."""
    await admin(sim, "DELETE", "/_sim/faults")
    for instance in await adapter.list_instances():
        await adapter.terminate(instance.instance_id)
    regions = adapter.settings.regions
    for region in regions:
        ec2 = client(sim, "ec2", region)
        for volume in (await call(ec2.describe_volumes))["Volumes"]:
            if any(t["Key"] == "gpuhop:role" and t["Value"] == "volume" for t in volume.get("Tags", [])):
                await adapter.delete_volume(volume["VolumeId"])
    # every instance ended and its machine's processes gone: the state flips first, and the
    # simulator reaps the killed processes a moment later (a loaded CI run saw the gap), so
    # both are waited for together, with a deadline that fails the test if a process lives on
    await wait_for(
        lambda: admin(sim, "GET", "/_sim/instances"),
        lambda data: all(r["state"] in ("terminated", "stopped") and not r["process_running"]
                         for r in data["instances"]),
        timeout=30.0,
    )
    for region in regions:
        assert (await call(client(sim, "ec2", region).describe_volumes))["Volumes"] == []
    await adapter.close()


def offer_for(offers: list[Offer], instance_type: str, zone: str, capacity: CapacityType) -> Offer:
    return next(o for o in offers if o.offer_id == f"{instance_type}@{zone}@{capacity.value}")


def request(
    offer: Offer, job: str, attempt: int, command: list[str], volume: ProviderVolume | None = None,
    bid: float | None = None,
) -> LaunchRequest:
    name = attempt_name(PREFIX, job, attempt)
    return LaunchRequest(
        name=name, idempotency_key=f"{name}/{offer.offer_id}", job_id=job, attempt=attempt,
        offer=offer, image="python:3.11-slim", command=command,
        env={"GPUHOP_JOB_ID": job, "GPUHOP_ATTEMPT": str(attempt), "GREETING": "it's \"quoted\"\nand multi-line"},
        disk_gb=20, volume=volume, mount_path="/workspace", bid_price_per_hour=bid,
    )


def threads_in_boto_calls() -> list[str]:
    """Names of the threads of this process that are inside an HTTP request made by botocore."""
    names = {t.ident: t.name for t in threading.enumerate()}
    busy = []
    for ident, frame in sys._current_frames().items():
        f: Any = frame
        while f is not None:
            if f.f_code.co_filename.endswith(("botocore/httpsession.py", "botocore/endpoint.py")):
                busy.append(names.get(ident, str(ident)))
                break
            f = f.f_back
    return busy
