"""What a launch sends and what its failures mean (issue 10, items 9 and 10): no spot MaxPrice;
a retry under one ClientToken with other parameters (EC2: IdempotentParameterMismatch) returns
the instance that token made, never a second one; quota errors are not scarcity and the Service
Quotas values mark offers unavailable; `UnfulfillableCapacity` is a capacity error; an instance
EC2 accepted and then ended at boot for want of capacity is a failed launch (LAUNCH_CAPACITY)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.aws.client import QuotaExceeded
from adapters.base import NoCapacity
from orchestrator.models import CapacityType, Instance, InstanceFault, InstanceState, Offer
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
    wait_for,
)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator


@pytest.fixture
async def aws(sim: AwsSimulator, tmp_path: Path) -> AsyncIterator[AwsAdapter]:
    adapter = make_adapter(sim, tmp_path)
    await adapter.start()
    yield adapter
    await clean_up(adapter, sim)


async def observed(aws: AwsAdapter, instance_id: str) -> Instance | None:
    return next((i for i in await aws.list_instances() if i.instance_id == instance_id), None)


def available(offers: list[Offer], instance_type: str, zone: str, capacity: CapacityType) -> int:
    return offer_for(offers, instance_type, zone, capacity).available


async def test_spot_launches_send_no_max_price(aws: AwsAdapter, sim: AwsSimulator) -> None:
    """Before the fix: MaxPrice = offer price x 1.5 (or the bid)."""
    offer = offer_for(await aws.offers(), "g6.xlarge", "us-east-1a", CapacityType.SPOT)
    await aws.launch(request(offer, "price1", 1, SLEEPER, bid=0.2))
    sent = sim.ec2.run_params[-1]
    assert sent["InstanceMarketOptions.MarketType"] == "spot"
    assert not [key for key in sent if "MaxPrice" in key]


async def test_a_retry_with_other_parameters_under_one_token_returns_that_tokens_instance(
    aws: AwsAdapter, sim: AwsSimulator
) -> None:
    """The attempt's instance ended before its launch was retried (so the name lookup, which
    skips ended instances, misses it) and the offer's price moved meanwhile: EC2 refuses the
    token with other parameters. Before the fix that was a PermanentError for the offer."""
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-west-2b", CapacityType.SPOT)
    first = await aws.launch(request(offer, "token1", 1, SLEEPER))
    await aws.terminate(first.instance_id)
    moved = dataclasses.replace(offer, price_per_hour=round(offer.price_per_hour * 1.2, 4))
    runs = sim.ec2.calls["RunInstances"]
    again = await aws.launch(request(moved, "token1", 1, SLEEPER))
    assert again.instance_id == first.instance_id
    assert sim.ec2.calls["RunInstances"] == runs + 1  # asked once, refused, then looked up
    assert [r["instance_id"] for r in (await admin(sim, "GET", "/_sim/instances"))["instances"]] == [first.instance_id]


async def test_the_simulator_refuses_one_token_with_other_parameters(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2", "us-west-2")
    base = {"ImageId": "ami-12345678", "InstanceType": "g5.xlarge", "MinCount": 1, "MaxCount": 1,
            "ClientToken": "t-1", "Placement": {"AvailabilityZone": "us-west-2a"}}
    first = await call(ec2.run_instances, **base)
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as refused:
        await call(ec2.run_instances, **base, InstanceMarketOptions={"MarketType": "spot", "SpotOptions": {"MaxPrice": "0.9"}})
    assert refused.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    found = await call(ec2.describe_instances, Filters=[{"Name": "client-token", "Values": ["t-1"]}])
    assert [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]] == [first["Instances"][0]["InstanceId"]]
    none = await call(ec2.describe_instances, Filters=[{"Name": "client-token", "Values": ["t-2"]}])
    assert none["Reservations"] == []
    await call(ec2.terminate_instances, InstanceIds=[first["Instances"][0]["InstanceId"]])


async def test_quotas_from_service_quotas_mark_offers_unavailable(sim: AwsSimulator, tmp_path: Path) -> None:
    """Read at start: P spot in us-east-1 is 0 vCPUs, G on-demand in us-west-2 is 8 (a g5.xlarge
    has 4, a g5.12xlarge 48). Before the fix every offer was available."""
    await admin(sim, "POST", "/_sim/quota", {"region": "us-east-1", "market": "spot", "family": "P", "vcpus": 0})
    await admin(sim, "POST", "/_sim/quota", {"region": "us-west-2", "market": "on-demand", "family": "G", "vcpus": 8})
    aws = make_adapter(sim, tmp_path)
    try:
        await aws.start()
        offers = await aws.offers()
        for itype in ("p4d.24xlarge", "p5.48xlarge"):
            assert available(offers, itype, "us-east-1a", CapacityType.SPOT) == 0
            assert available(offers, itype, "us-east-1a", CapacityType.ON_DEMAND) == 1
            assert available(offers, itype, "us-west-2a", CapacityType.SPOT) == 1
        assert available(offers, "g5.12xlarge", "us-west-2b", CapacityType.ON_DEMAND) == 0
        assert available(offers, "g5.xlarge", "us-west-2b", CapacityType.ON_DEMAND) == 1
        assert available(offers, "g5.12xlarge", "us-west-2b", CapacityType.SPOT) == 1
    finally:
        await clean_up(aws, sim)


async def test_a_quota_error_at_launch_is_not_scarcity(aws: AwsAdapter, sim: AwsSimulator) -> None:
    """G spot in us-east-1 holds one g5.xlarge (4 vCPUs). Before the fix the second launch's
    MaxSpotInstanceCountExceeded was NoCapacity (retried as if capacity might come back)."""
    await admin(sim, "POST", "/_sim/quota", {"region": "us-east-1", "market": "spot", "family": "G", "vcpus": 4})
    offers = await aws.offers()
    assert available(offers, "g5.xlarge", "us-east-1a", CapacityType.SPOT) == 1  # 4 <= 4
    assert available(offers, "g5.12xlarge", "us-east-1a", CapacityType.SPOT) == 1  # quota read at start
    await aws.launch(request(offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.SPOT), "quota1", 1, SLEEPER))
    with pytest.raises(QuotaExceeded, match="MaxSpotInstanceCountExceeded") as raised:
        await aws.launch(request(offer_for(offers, "g6.xlarge", "us-east-1b", CapacityType.SPOT), "quota2", 1, SLEEPER))
    assert not isinstance(raised.value, NoCapacity)
    after = await aws.offers()
    assert available(after, "g6.xlarge", "us-east-1b", CapacityType.SPOT) == 0  # held over quota
    assert available(after, "g6.xlarge", "us-east-1b", CapacityType.ON_DEMAND) == 1
    assert available(after, "g6.xlarge", "us-west-2a", CapacityType.SPOT) == 1

    await admin(sim, "POST", "/_sim/quota", {"region": "us-west-2", "market": "on-demand", "vcpus": 0})
    with pytest.raises(QuotaExceeded, match="VcpuLimitExceeded"):
        await aws.launch(request(offer_for(offers, "g5.xlarge", "us-west-2a", CapacityType.ON_DEMAND), "quota3", 1, SLEEPER))


async def test_unfulfillable_capacity_is_a_capacity_error(aws: AwsAdapter, sim: AwsSimulator) -> None:
    await admin(sim, "POST", "/_sim/faults", {"code": "UnfulfillableCapacity", "count": 1, "actions": ["RunInstances"],
                                              "message": "Unable to fulfill capacity due to your request configuration."})
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    with pytest.raises(NoCapacity, match="UnfulfillableCapacity"):
        await aws.launch(request(offer, "cap1", 1, SLEEPER))


@pytest.mark.parametrize("code", ["Server.InsufficientInstanceCapacity", "Server.InternalError"])
async def test_an_instance_ended_at_boot_is_a_failed_launch(aws: AwsAdapter, sim: AwsSimulator, code: str) -> None:
    """EC2 accepted the launch, then the instance went pending -> terminated. Before the fix it
    was an ordinary TERMINATED instance (to the engine: a lost job, counted as a relaunch)."""
    await admin(sim, "POST", "/_sim/launch_failures", {"code": code, "instance_type": "g5.xlarge", "zone": "us-east-1b"})
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1b", CapacityType.SPOT)
    launched = await aws.launch(request(offer, "boot1", 1, SLEEPER))
    assert launched.state is InstanceState.PENDING and launched.fault is None
    ended = await wait_for(
        partial(observed, aws, launched.instance_id),
        lambda i: i is not None and i.extra["ec2_state"] == "terminated", timeout=15,
    )
    assert ended is not None
    assert (ended.state, ended.fault) == (InstanceState.TERMINATED, InstanceFault.LAUNCH_CAPACITY)
    assert ended.reason.startswith(code) and not ended.stopped_by_us
    assert ended.bill is not None and ended.bill.cost_usd == 0  # it never ran: EC2 bills from running on
    ledger = {e["id"]: e for e in (await admin(sim, "GET", "/_sim/ledger"))["entries"]}
    assert ledger[launched.instance_id]["cost_usd"] == 0
    # the next launch there is an ordinary one
    second = await aws.launch(request(offer, "boot2", 1, SLEEPER))
    running = await wait_for(partial(observed, aws, second.instance_id),
                             lambda i: i is not None and i.state is InstanceState.RUNNING, timeout=15)
    assert running is not None and running.fault is None
