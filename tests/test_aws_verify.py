"""`gpuhop check-config` for AWS (issue 10, item 13): `AwsAdapter.verify()` makes one cheap
read-only call (DescribeRegions) with its own clients, closes them, needs no start(), and turns
refused credentials into AuthError. Before the fix it was the base class's "no credentials to
check" and made no call at all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.base import AdapterError, AuthError
from simulators.aws import AwsSimulator
from tests.aws_fixtures import admin, make_adapter, running_simulator, threads_in_boto_calls


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator



async def test_verify_reads_once_without_start(sim: AwsSimulator, tmp_path: Path) -> None:
    aws = make_adapter(sim, tmp_path)
    before = sim.ec2.calls["DescribeRegions"]
    text = await aws.verify()
    assert sim.ec2.calls["DescribeRegions"] == before + 1
    assert sum(sim.ec2.calls.values()) == before + 1  # nothing else, and no start()
    assert "credentials ok" in text and "us-east-1" in text and "2 of 2" in text
    assert not threads_in_boto_calls()
    await aws.close()


async def test_verify_refused_credentials_and_regions_not_enabled(sim: AwsSimulator, tmp_path: Path) -> None:
    aws = make_adapter(sim, tmp_path, regions=["us-east-1", "xx-nowhere-1"])
    try:
        assert "not enabled: xx-nowhere-1" in await aws.verify()
        await admin(sim, "POST", "/_sim/faults", {"code": "AuthFailure", "count": 1, "actions": ["DescribeRegions"],
                                                  "message": "AWS was not able to validate the provided access credentials"})
        with pytest.raises(AuthError, match="AuthFailure"):
            await aws.verify()
        await admin(sim, "POST", "/_sim/faults", {"code": "InternalError", "rate": 1.0, "actions": ["DescribeRegions"]})
        with pytest.raises(AdapterError) as raised:
            await aws.verify()
        assert not isinstance(raised.value, AuthError)
    finally:
        await admin(sim, "DELETE", "/_sim/faults")
        await aws.close()
