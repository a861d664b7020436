"""The orphan reaper, driven tick by tick: a machine that carries our prefix but belongs to no
live attempt is terminated (it would bill money nobody accounts for), and nothing else is:
not a live attempt's machine, not a machine of someone else's on the same account.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.base import RetryLater
from orchestrator.models import JobSpec
from orchestrator.store import AttemptRow
from tests.fake_provider import FakeAdapter, Rig

SPEC = JobSpec.model_validate({
    "name": "train", "command": ["python3", "train.py"], "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
})


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig.create(tmp_path, FakeAdapter.create(tmp_path, capacity={"r1": 8}, list_foreign=True))
    try:
        yield r
    finally:
        await r.engine.drain()
        r.close()


def running_attempt(r: Rig, job_id: str) -> AttemptRow | None:
    return next((a for a in r.store.attempts(job_id) if a.status == "running"), None)


async def test_an_orphan_is_terminated_and_nothing_else(rig: Rig) -> None:
    rig.store.create_job("j1", SPEC)
    ours = await rig.until(lambda: running_attempt(rig, "j1"), "j1 running")
    orphan = rig.fake.add_instance("gpuhop-zz9-1")  # a job this store never heard of
    stray = rig.fake.add_instance("gpuhop-j1-7")  # an attempt number j1 never had
    foreign = [rig.fake.add_instance(n) for n in ("someone-else-1", "gpuhopper-j1-1", "train-j1-1")]

    await rig.until(lambda: {orphan, stray} <= set(rig.fake.terminated()), "both orphans terminated")
    for _ in range(3):
        await rig.step()
    terminated = rig.fake.terminated()
    assert set(terminated) == {orphan, stray}, rig.describe()
    assert all(b is not None and b.ended_at is not None for b in terminated.values())
    assert [i.instance_id for i in rig.fake.live()] == [ours.instance_id, *foreign]
    assert running_attempt(rig, "j1") is not None and rig.store.get_job("j1").status == "running"
    assert rig.store.attempt_by_name("gpuhop-zz9-1") is None  # an orphan is stopped, not adopted


async def test_a_machine_whose_stop_failed_is_stopped_on_a_later_tick(rig: Rig) -> None:
    rig.store.create_job("j1", SPEC)
    attempt = await rig.until(lambda: running_attempt(rig, "j1"), "j1 running")
    rig.fake.fail_next("terminate", 2, RetryLater)  # the provider refuses the first two stops
    rig.fake.exit(attempt.instance_id or "", 0)
    await rig.until(lambda: rig.store.get_job("j1").status == "succeeded", "j1 succeeded")
    await rig.until(lambda: attempt.instance_id in rig.fake.terminated(), "its machine stopped in the end")
    assert rig.fake.calls["terminate"] >= 3
    assert not rig.fake.live()


async def test_a_duplicate_launch_is_terminated_and_the_attempt_keeps_its_own(rig: Rig) -> None:
    """Two machines carry one attempt's name (a launch retried where the provider had already
    made one): the one the attempt does not record is terminated at once."""
    rig.store.create_job("j1", SPEC)
    attempt = await rig.until(lambda: running_attempt(rig, "j1"), "j1 running")
    duplicate = rig.fake.add_instance(attempt.name)
    await rig.until(lambda: duplicate in rig.fake.terminated(), "the duplicate terminated")
    for _ in range(3):
        await rig.step()
    assert set(rig.fake.terminated()) == {duplicate}
    after = running_attempt(rig, "j1")
    assert after is not None and after.instance_id == attempt.instance_id
