"""IMDSv2 (issue 10, item 8): organisations deny RunInstances unless MetadataHttpTokens=required,
and an instance launched so answers a tokenless metadata read with 401. The simulator does both;
the adapter launches IMDSv2-only with hop limit 1, and the job agent reads the spot notice with a
session token (PUT latest/api/token, then the token on every read, renewed before it expires)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from adapters.aws import AwsAdapter
from orchestrator.agent import MetadataReader
from orchestrator.models import CapacityType
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
    async with running_simulator(tmp_path / "sim", require_imdsv2=True) as simulator:
        yield simulator


@pytest.fixture
async def aws(sim: AwsSimulator, tmp_path: Path) -> AsyncIterator[AwsAdapter]:
    adapter = make_adapter(sim, tmp_path)
    await adapter.start()
    yield adapter
    await clean_up(adapter, sim)


def _run(ec2: object, **extra: object) -> dict[str, object]:
    params: dict[str, object] = {
        "ImageId": "ami-12345678", "InstanceType": "g5.xlarge", "MinCount": 1, "MaxCount": 1,
        "Placement": {"AvailabilityZone": "us-east-1a"}, "InstanceMarketOptions": {"MarketType": "spot"},
    }
    params.update(extra)
    answer: dict[str, object] = ec2.run_instances(**params)["Instances"][0]  # type: ignore[attr-defined]
    return answer


async def _imds(sim: AwsSimulator, method: str, url: str, headers: dict[str, str]) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_the_simulator_is_as_strict_as_an_scp_and_imdsv2(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    with pytest.raises(ClientError) as refused:
        await call(_run, ec2=ec2)
    assert refused.value.response["Error"]["Code"] == "UnauthorizedOperation"
    assert "explicit deny in a service control policy" in refused.value.response["Error"]["Message"]
    iid = str((await call(_run, ec2=ec2, MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 1}))["InstanceId"])
    base = f"{sim.url}/_sim/metadata/{iid}/latest"
    assert (await _imds(sim, "GET", f"{base}/meta-data/instance-id", {}))[0] == 401
    assert (await _imds(sim, "PUT", f"{base}/api/token", {}))[0] == 400  # the TTL header is required
    assert (await _imds(sim, "PUT", f"{base}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21601"}))[0] == 400
    status, token = await _imds(sim, "PUT", f"{base}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200 and token
    assert await _imds(sim, "GET", f"{base}/meta-data/instance-id", {"X-aws-ec2-metadata-token": token}) == (200, iid)
    assert (await _imds(sim, "GET", f"{base}/meta-data/instance-id", {"X-aws-ec2-metadata-token": "forged"}))[0] == 401
    assert (await _imds(sim, "GET", f"{base}/meta-data/spot/instance-action", {"X-aws-ec2-metadata-token": token}))[0] == 404
    await call(ec2.terminate_instances, InstanceIds=[iid])


async def test_launches_are_imdsv2_only_with_hop_limit_1(aws: AwsAdapter, sim: AwsSimulator) -> None:
    """Before the fix: UnauthorizedOperation (AuthError) under the SCP; HttpTokens was optional."""
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    launched = await aws.launch(request(offer, "imds1", 1, SLEEPER))
    sent = sim.ec2.run_params[-1]
    assert sent["MetadataOptions.HttpTokens"] == "required"
    assert sent["MetadataOptions.HttpPutResponseHopLimit"] == "1"
    assert sim.fleet.instances[launched.instance_id].http_tokens == "required"


async def test_the_agent_reads_the_notice_with_a_session_token(aws: AwsAdapter, sim: AwsSimulator) -> None:
    """The agent on the instance (the simulator points GPUHOP_METADATA_URL at its IMDS) sees the
    spot notice. Before the fix every read it made was tokenless and got 401."""
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    req = request(offer, "imds2", 1, SLEEPER)
    req.env["GPUHOP_METADATA_POLL"] = "0.2"
    launched = await aws.launch(req)
    rec = sim.fleet.instances[launched.instance_id]
    spot_path = "latest/meta-data/spot/instance-action"
    await wait_for(lambda: _served(rec.imds_log, spot_path), lambda s: 404 in s, timeout=30)
    await admin(sim, "POST", f"/_sim/instances/{launched.instance_id}/interrupt", {"notice_seconds": 30})
    await wait_for(lambda: _served(rec.imds_log, spot_path), lambda s: 200 in s, timeout=30)
    assert 401 not in await _served(rec.imds_log, spot_path)


async def _served(log: list[tuple[str, int]], path: str) -> set[int]:
    return {status for p, status in log if p == path}


async def test_the_reader_renews_its_token_and_recovers_from_a_refused_one(aws: AwsAdapter, sim: AwsSimulator) -> None:
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-west-2a", CapacityType.SPOT)
    launched = await aws.launch(request(offer, "imds3", 1, SLEEPER))
    url = f"{sim.url}/_sim/metadata/{launched.instance_id}/latest/meta-data/instance-id"
    reader = MetadataReader(url, ttl=2)  # renewed a second before it runs out
    assert await asyncio.to_thread(reader.read) == launched.instance_id.encode()
    first = reader.token
    await wait_for(lambda: asyncio.to_thread(reader.read), lambda _: reader.token != first, timeout=15, interval=0.2)
    assert await asyncio.to_thread(reader.read) == launched.instance_id.encode()
    reader.token = "revoked"  # e.g. the service restarted: 401 drops it, the next read asks anew
    assert await asyncio.to_thread(reader.read) is None
    assert await asyncio.to_thread(reader.read) == launched.instance_id.encode()


def test_the_reader_derives_the_token_url() -> None:
    reader = MetadataReader("http://169.254.169.254/latest/meta-data/spot/instance-action")
    assert reader.token_url == "http://169.254.169.254/latest/api/token"
    assert MetadataReader("http://example.invalid/other").token_url == ""


def test_the_bootstrap_script_uses_the_token_flow() -> None:
    import gzip

    from adapters.aws.userdata import build_user_data
    from orchestrator.models import Offer

    offer = Offer(provider="aws", offer_id="g5.xlarge@us-east-1a@spot", region="us-east-1a", gpu="A10G",
                  gpu_count=1, vram_gb=24, vcpu=4, memory_gb=16, disk_gb=100, capacity=CapacityType.SPOT,
                  price_per_hour=0.4)
    script = gzip.decompress(build_user_data(request(offer, "imds4", 1, ["true"]), "/dev/sdf")).decode()
    reads = [line for line in script.splitlines() if "169.254.169.254/latest/meta-data" in line and "curl" in line]
    assert reads and all("X-aws-ec2-metadata-token:" in line for line in reads)
    assert "-X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds:" in script
