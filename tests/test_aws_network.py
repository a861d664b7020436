"""Accounts without a default VPC (issue 10, item 12): EC2 refuses a launch without a subnet
there (VPCIdNotSpecified), so the adapter launches into the configured or tagged subnet of each
zone, offers only zones that have one, and says at start-up what to configure when no zone has."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from adapters.aws.network import choose_subnets, tag_filter
from adapters.base import PermanentError
from orchestrator.models import CapacityType
from simulators.aws import AwsSimulator
from tests.aws_fixtures import (
    SLEEPER,
    call,
    clean_up,
    client,
    make_adapter,
    offer_for,
    request,
    running_simulator,
)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim", default_vpc=False) as simulator:
        yield simulator


async def _subnet_in(sim: AwsSimulator, region: str, zone: str) -> str:
    ec2 = client(sim, "ec2", region)
    rows = (await call(ec2.describe_subnets, Filters=[{"Name": "availability-zone", "Values": [zone]}]))["Subnets"]
    return str(rows[0]["SubnetId"])


async def test_without_a_default_vpc_ec2_wants_a_subnet(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    assert (await call(ec2.describe_vpcs, Filters=[{"Name": "is-default", "Values": ["true"]}]))["Vpcs"] == []
    params: dict[str, Any] = {"ImageId": "ami-12345678", "InstanceType": "g5.xlarge", "MinCount": 1, "MaxCount": 1,
                              "Placement": {"AvailabilityZone": "us-east-1a"}}
    with pytest.raises(ClientError) as refused:
        await call(ec2.run_instances, **params)
    assert refused.value.response["Error"]["Code"] == "VPCIdNotSpecified"
    other_zone = await _subnet_in(sim, "us-east-1", "us-east-1b")
    with pytest.raises(ClientError) as mismatch:
        await call(ec2.run_instances, **params, SubnetId=other_zone)
    assert mismatch.value.response["Error"]["Code"] == "InvalidParameterValue"
    made = await call(ec2.run_instances, **params, SubnetId=await _subnet_in(sim, "us-east-1", "us-east-1a"))
    await call(ec2.terminate_instances, InstanceIds=[made["Instances"][0]["InstanceId"]])


async def test_start_says_what_to_configure(sim: AwsSimulator, tmp_path: Path) -> None:
    """Before the fix start() succeeded, offers listed every zone and each launch failed."""
    aws = make_adapter(sim, tmp_path, regions=["us-east-1"])
    try:
        with pytest.raises(PermanentError) as raised:
            await aws.start()
        text = str(raised.value)
        assert "us-east-1 has no default VPC" in text and "subnet_ids" in text and "subnet_tag" in text
        assert "\n" not in text
    finally:
        await aws.close()


async def test_tagged_subnets_are_used_and_only_their_zones_offered(sim: AwsSimulator, tmp_path: Path) -> None:
    east_a = await _subnet_in(sim, "us-east-1", "us-east-1a")
    west_b = await _subnet_in(sim, "us-west-2", "us-west-2b")
    await call(client(sim, "ec2").create_tags, Resources=[east_a], Tags=[{"Key": "gpuhop", "Value": "yes"}])
    await call(client(sim, "ec2", "us-west-2").create_tags, Resources=[west_b], Tags=[{"Key": "gpuhop", "Value": "yes"}])
    aws = make_adapter(sim, tmp_path, subnet_tag="gpuhop")
    try:
        await aws.start()
        offers = await aws.offers()
        assert {o.region for o in offers} == {"us-east-1a", "us-west-2b"}
        for zone, subnet in (("us-east-1a", east_a), ("us-west-2b", west_b)):
            await aws.launch(request(offer_for(offers, "g5.xlarge", zone, CapacityType.SPOT), f"net-{zone}", 1, SLEEPER))
            assert sim.ec2.run_params[-1]["SubnetId"] == subnet
    finally:
        await clean_up(aws, sim)


async def test_configured_subnets_win_for_their_zones(sim: AwsSimulator, tmp_path: Path) -> None:
    east_b = await _subnet_in(sim, "us-east-1", "us-east-1b")
    aws = make_adapter(sim, tmp_path, regions=["us-east-1"], subnet_ids={"us-east-1b": east_b})
    try:
        await aws.start()
        offers = await aws.offers()
        assert {o.region for o in offers} == {"us-east-1b"}
        await aws.launch(request(offer_for(offers, "g6.xlarge", "us-east-1b", CapacityType.ON_DEMAND), "net-b", 1, SLEEPER))
        assert sim.ec2.run_params[-1]["SubnetId"] == east_b
    finally:
        await clean_up(aws, sim)


def test_choosing_subnets() -> None:
    rows = [
        {"SubnetId": "subnet-b", "AvailabilityZone": "z1", "AvailableIpAddressCount": 10, "State": "available"},
        {"SubnetId": "subnet-a", "AvailabilityZone": "z1", "AvailableIpAddressCount": 10, "State": "available"},
        {"SubnetId": "subnet-c", "AvailabilityZone": "z1", "AvailableIpAddressCount": 5, "State": "available"},
        {"SubnetId": "subnet-d", "AvailabilityZone": "z2", "AvailableIpAddressCount": 500, "State": "pending"},
        {"SubnetId": "subnet-e", "AvailabilityZone": "z2", "AvailableIpAddressCount": 1, "State": "available"},
    ]
    assert choose_subnets(rows) == {"z1": "subnet-a", "z2": "subnet-e"}
    assert tag_filter("gpuhop") == {"Name": "tag-key", "Values": ["gpuhop"]}
    assert tag_filter("team=ml") == {"Name": "tag:team", "Values": ["ml"]}
