"""Helpers shared by the AWS simulator and adapter tests: a running simulator with short timings,
boto3 clients pointed at it (called off the event loop, since the simulator shares the loop),
the admin API, and polling with a deadline instead of fixed sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import boto3
from botocore.config import Config

from simulators.aws import AwsSimulator

BOOT = 0.2
NOTICE = 1.0
GRACE = 0.5
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
