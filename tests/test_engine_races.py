"""The Engine run as the daemon runs it (`Engine.run`: ticks back to back, launches in
background workers that finish while a tick is half-way through its jobs), against the
in-process fake provider: a tick must never act on a view of a job that a launch has changed
since the tick read it.

The race this guards: a tick reads the store (job X has no attempt yet), a launch worker then
records and starts X's attempt 1 and finishes; later in the same tick, X's turn comes, its stale
view says "nothing live", and a second attempt is launched on a second machine onto the same
volume. Seen in the fault storm on RunPod, whose simulator answers fast: two processes wrote
one volume and 527 steps ran twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator.models import JobSpec
from tests.fake_provider import FakeAdapter, Rig

JOBS = 40


def spec(i: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"race{i}", "command": ["python3", "train.py"], "resources": {"gpu": ["RTX-4090"]},
        "volume": {"name": f"vol{i}", "size_gb": 10},
    })


async def test_no_job_gets_a_second_attempt_from_a_stale_tick(tmp_path: Path) -> None:
    fake = FakeAdapter.create(tmp_path, capacity={"r1": 1000}, prices={"r1": 0.5},
                              delays={"launch": 0.02, "ensure_volume": 0.01, "list": 0.005})
    rig = Rig.create(tmp_path, fake, tick_seconds=0.01, offer_refresh_seconds=0.001, listing_wait_seconds=0.05)
    try:
        for i in range(JOBS):
            rig.store.create_job(f"j{i:03d}", spec(i))
        stop = asyncio.Event()
        loop = asyncio.create_task(rig.engine.run(stop))
        deadline = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            if all(j.status == "running" for j in rig.store.list_jobs(limit=1000)):
                break
        for _ in range(20):  # and a while longer: nothing may change now
            await asyncio.sleep(0.02)
        stop.set()
        await loop
        per_job = {f"j{i:03d}": [a.number for a in rig.store.attempts(f"j{i:03d}")] for i in range(JOBS)}
        doubled = {job: numbers for job, numbers in per_job.items() if numbers != [1]}
        assert not doubled, f"jobs launched more than once: {doubled}\n{rig.describe()}"
        assert len(fake.created()) == JOBS
    finally:
        rig.close()
