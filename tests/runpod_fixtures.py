"""Shared pieces for the RunPod simulator and adapter tests: a simulator running in-process on a
free port with short timings, an adapter pointed at it, and polling helpers.

Import explicitly (`from tests.runpod_fixtures import running_sim, ...`) and wrap `running_sim` in a
fixture of the test module; this is not a conftest so the lead's tests/conftest.py stays the only
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import runpod

from adapters.base import AdapterContext
from adapters.runpod import RunPodAdapter, RunPodSettings
from simulators.runpod import RunPodSimulator

API_KEY = "rpa_TESTKEY_0123456789abcdef"
START_DELAY = 0.2
NOTICE = 0.5


async def wait_until(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any], within: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def admin(sim: RunPodSimulator, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{sim.url}{path}", json=body) as resp:
            assert resp.status < 400, await resp.text()
            return await resp.json()


async def sim_pods(sim: RunPodSimulator) -> list[dict[str, Any]]:
    return list((await admin(sim, "GET", "/_sim/pods"))["pods"])


def no_process_left(sim: RunPodSimulator) -> bool:
    for machine in sim.runtime.machines.values():
        if machine.proc.returncode is None:
            return False
        try:
            os.kill(machine.proc.pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@contextlib.asynccontextmanager
async def running_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunPodSimulator]:
    """A running simulator with short timings; the SDK (env RUNPOD_API_BASE_URL and
    runpod.api_key) points at it. On exit it is stopped and no pod process may be left."""
    sim = RunPodSimulator(
        tmp_path / "sim", api_key=API_KEY, start_delay=START_DELAY, notice_seconds=NOTICE
    )
    url = await sim.start()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", url)
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    monkeypatch.setattr(runpod, "api_key", API_KEY)
    try:
        yield sim
    finally:
        await sim.stop()
        assert no_process_left(sim), "a pod process outlived the simulator"


def adapter_for(sim: RunPodSimulator, tmp_path: Path, **overrides: Any) -> RunPodAdapter:
    table: dict[str, Any] = {
        "api_key": sim.api_key,
        "api_url": sim.url,
        "request_timeout_seconds": 2.0,
        "retry_attempts": 3,
        "retry_base_delay_seconds": 0.05,
        "retry_budget_seconds": 5.0,
    }
    table.update(overrides)
    ctx = AdapterContext(
        prefix="gpuhop",
        state_dir=tmp_path / "state",
        logs_dir=tmp_path / "logs",
        public_url="http://127.0.0.1:9",
    )
    return RunPodAdapter(RunPodSettings.model_validate(table), ctx)
