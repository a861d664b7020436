"""What the Engine does when a provider ends a machine for a reason that is neither the job's
exit nor a reclaim (`Instance.fault`): RunPod's "Exited by RunPod" for an image it cannot pull
or for an empty balance, and EC2's pending -> terminated for want of capacity. Each used to be
read as a preemption and relaunched up to `max_relaunches` times: a bad image paid for eleven
machines, an empty balance relaunched into the same refusal.

Driven tick by tick against the in-process fake provider (tests/fake_provider.py) on a real
Store, asserting what the store records and what the fake's ledger shows was created.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import metrics
from orchestrator.models import InstanceFault, InstanceState, JobSpec
from orchestrator.store import AttemptRow, JobRow
from tests.fake_provider import FakeAdapter, Rig

JOB = "j1"


def spec(**policy: Any) -> JobSpec:
    return JobSpec.model_validate({
        "name": "train", "command": ["python3", "train.py"], "image": "ghcr.io/acme/trainer:v1",
        "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
        "policy": {"max_relaunches": 5, "max_retries_on_error": 3, **policy},
    })


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig.create(tmp_path, FakeAdapter.create(tmp_path, capacity={"r1": 4, "r2": 4}, prices={"r1": 0.5, "r2": 0.4}),
                   account_suspend_seconds=3600)
    try:
        yield r
    finally:
        await r.engine.drain()
        r.close()


def job(r: Rig) -> JobRow:
    row = r.store.get_job(JOB)
    assert row is not None
    return row  # type: ignore[no-any-return]


def attempts(r: Rig) -> list[AttemptRow]:
    return list(r.store.attempts(JOB))


def running(r: Rig, number: int) -> AttemptRow | None:
    return next((a for a in attempts(r) if a.number == number and a.status == "running"), None)


async def test_an_image_the_provider_cannot_run_fails_the_job_after_one_attempt(rig: Rig) -> None:
    rig.store.create_job(JOB, spec())
    first = await rig.until(lambda: running(rig, 1), "attempt 1 running")
    rig.fake.fail(first.instance_id or "", InstanceFault.IMAGE,
                  "Exited by Runpod: failed to pull image ghcr.io/acme/trainer:v1")
    await rig.until(lambda: job(rig).status == "failed", "the job failed")
    row = job(rig)
    assert row.end_reason is not None and "cannot run the job's image" in row.end_reason
    assert "failed to pull image" in row.end_reason, row.end_reason
    (a,) = attempts(rig)  # retries left (3) and relaunches left (5): neither is spent on it
    assert (a.end_reason, row.relaunches, row.retries) == ("failed", 0, 0)
    for _ in range(3):
        await rig.step()
    assert len(rig.fake.created()) == 1, "a machine was rented again for an image that cannot run"
    await rig.until(lambda: first.instance_id in rig.fake.terminated(), "the failed machine terminated")


async def test_an_account_stop_suspends_the_provider_instead_of_relaunching(rig: Rig) -> None:
    before = metrics.PROVIDER_SUSPENSIONS.labels("fake")._value.get()
    rig.store.create_job(JOB, spec())
    first = await rig.until(lambda: running(rig, 1), "attempt 1 running")
    rig.fake.fail(first.instance_id or "", InstanceFault.ACCOUNT, "Exited by RunPod: Insufficient balance")
    await rig.until(lambda: attempts(rig)[0].status == "ended", "attempt 1 ended")
    for _ in range(5):
        await rig.step()
    row = job(rig)
    (a,) = attempts(rig)
    assert a.end_reason == "no_capacity" and "Insufficient balance" in (a.detail or ""), a.detail
    assert row.status == "recovering" and row.relaunches == 0, (row.status, row.relaunches)
    assert len(rig.fake.created()) == 1, "relaunched into the same refusal"
    assert "suspended for launches" in (row.message or ""), row.message
    kinds = [e.kind for e in rig.store.events(JOB)]
    assert kinds.count("provider_suspended") == 1, kinds
    assert metrics.PROVIDER_SUSPENSIONS.labels("fake")._value.get() == before + 1
    assert rig.engine.health["fake"].suspended_why == "Exited by RunPod: Insufficient balance"

    # topped up: once the suspension is over the job is placed again
    rig.engine.health["fake"].suspended_until = 1.0
    await rig.until(lambda: running(rig, 2), "attempt 2 running after the suspension")
    assert job(rig).relaunches == 0


async def test_a_launch_that_dies_for_capacity_is_re_placed_elsewhere_without_a_relaunch(rig: Rig) -> None:
    rig.fake.start_state = InstanceState.PENDING
    rig.store.create_job(JOB, spec(max_relaunches=0))  # no relaunch allowed: a failed launch is not one
    await rig.until(lambda: attempts(rig) and attempts(rig)[0].instance_id, "attempt 1 launched")
    first = attempts(rig)[0]
    assert first.region == "r2"  # the cheaper one
    rig.fake.fail(first.instance_id or "", InstanceFault.LAUNCH_CAPACITY,
                  "Server.InsufficientInstanceCapacity: Insufficient capacity.", InstanceState.TERMINATED)
    await rig.until(lambda: len(attempts(rig)) == 2 and attempts(rig)[1].instance_id, "attempt 2 launched")
    ended, second = attempts(rig)
    assert ended.end_reason == "no_capacity" and "InsufficientInstanceCapacity" in (ended.detail or "")
    assert second.region == "r1", "the offer whose launch just died was tried again first"
    rig.fake.boot(second.instance_id or "")
    await rig.until(lambda: running(rig, 2), "attempt 2 running")
    assert job(rig).relaunches == 0 and job(rig).status == "running"
