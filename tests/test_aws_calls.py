"""The AWS adapter's calls against a slow EC2: every boto3 call runs on the adapter's own
threads, a cancelled caller waits for its call to end (none is left running behind it), and a
RunInstances that outlives the client's read timeout, which EC2 still carries out, never
becomes a second machine however often the launch is retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.base import RetryLater
from orchestrator.models import CapacityType, Instance, InstanceState
from simulators.aws import AwsSimulator
from tests.aws_fixtures import (
    SLEEPER,
    admin,
    call,
    clean_up,
    client,
    make_adapter,
    offer_for,
    request,
    running_simulator,
    threads_in_boto_calls,
    wait_for,
)

SLOW = 2.5  # seconds EC2 takes to answer RunInstances: longer than the client's read timeout


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator


@pytest.fixture
async def aws(sim: AwsSimulator, tmp_path: Path) -> AsyncIterator[AwsAdapter]:
    adapter = make_adapter(sim, tmp_path, request_timeout=1.0, retry_attempts=2)
    yield adapter
    await clean_up(adapter, sim)


async def _busy() -> list[str]:
    return threads_in_boto_calls()


async def _named(sim: AwsSimulator, name: str) -> list[dict[str, object]]:
    rows = (await admin(sim, "GET", "/_sim/instances"))["instances"]
    return [r for r in rows if r["name"] == name]


async def test_a_cancelled_call_ends_with_its_caller_on_the_adapters_own_threads(
    aws: AwsAdapter, sim: AwsSimulator
) -> None:
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
    await admin(sim, "POST", "/_sim/faults", {"code": "latency", "delay": SLOW, "actions": ["RunInstances"], "rate": 1.0})
    req = request(offer, "slow1", 1, SLEEPER)
    launch = asyncio.create_task(aws.launch(req))
    await wait_for(lambda: _received(sim, "RunInstances"), bool)
    busy = await wait_for(_busy, bool)
    assert all(name.startswith("gpuhop-aws") for name in busy), busy  # not the loop's default pool
    launch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await launch
    assert threads_in_boto_calls() == []  # the call ended before its caller did

    # EC2 carried the launch out all the same, once (the retry inside the call kept its token)
    await admin(sim, "DELETE", "/_sim/faults")
    await wait_for(lambda: _quiet(sim), bool, timeout=30)
    assert len(await _named(sim, req.name)) == 1


async def test_a_launch_retried_past_read_timeouts_makes_one_instance(aws: AwsAdapter, sim: AwsSimulator) -> None:
    offer = offer_for(await aws.offers(), "g6.xlarge", "us-east-1b", CapacityType.SPOT)
    await admin(sim, "POST", "/_sim/faults", {"code": "latency", "delay": SLOW, "actions": ["RunInstances"], "rate": 1.0})
    req = request(offer, "slow2", 1, SLEEPER)
    found: Instance | None = None
    timeouts = 0
    for _ in range(20):  # the engine retries a launch that raised RetryLater
        try:
            found = await aws.launch(req)
            break
        except RetryLater as exc:
            assert "ReadTimeoutError" in str(exc)
            timeouts += 1
    assert found is not None and timeouts >= 1
    assert found.name == req.name
    await admin(sim, "DELETE", "/_sim/faults")
    assert (await aws.launch(req)).instance_id == found.instance_id
    await wait_for(lambda: _quiet(sim), bool, timeout=30)  # every delayed request was carried out
    rows = await wait_for(lambda: _named(sim, req.name), lambda r: len(r) == 1 and r[0]["state"] == "running")
    assert rows[0]["instance_id"] == found.instance_id


async def test_every_instance_is_listed_even_two_with_one_name(aws: AwsAdapter, sim: AwsSimulator) -> None:
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
    req = request(offer, "dup", 1, SLEEPER)
    first = await aws.launch(req)
    tags = [{"Key": "Name", "Value": req.name}, {"Key": "gpuhop:managed", "Value": "gh"}]
    ec2 = client(sim, "ec2")
    second = await call(
        ec2.run_instances, ImageId="ami-12345678", InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        Placement={"AvailabilityZone": "us-east-1a"},
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    listed = [i for i in await aws.list_instances() if i.name == req.name]
    assert sorted(i.instance_id for i in listed) == sorted([first.instance_id, second["Instances"][0]["InstanceId"]])
    assert all(i.state in (InstanceState.PENDING, InstanceState.RUNNING) for i in listed)


async def _quiet(sim: AwsSimulator) -> bool:
    return sim.requests_in_flight() == 0


async def _received(sim: AwsSimulator, action: str) -> bool:
    return sim.ec2.calls[action] > 0
