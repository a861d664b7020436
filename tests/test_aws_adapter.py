"""The AWS adapter against the AWS simulator: offers, idempotent launches, volumes that follow a
job between attempts, state normalization (incl. PREEMPTED), spot warnings, and error mapping.
Each test must leave no instance, volume or process behind that it did not create itself."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.aws.settings import AwsSettings
from adapters.base import AdapterContext, AuthError, NoCapacity, PermanentError, RetryLater
from orchestrator.models import (
    CapacityType,
    Instance,
    InstanceState,
    LaunchRequest,
    Offer,
    ProviderVolume,
    attempt_name,
)
from simulators.aws import AwsSimulator
from tests.aws_fixtures import (
    NOTICE,
    admin,
    call,
    client,
    http_get,
    running_simulator,
    wait_for,
)

PREFIX = "gh"


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator


@pytest.fixture
async def aws(sim: AwsSimulator, tmp_path: Path) -> AsyncIterator[AwsAdapter]:
    settings = AwsSettings.model_validate({
        "regions": ["us-east-1", "us-west-2"], "endpoint_url": sim.url,
        "access_key_id": "testing", "secret_access_key": "testing",
        "retry_attempts": 3, "retry_max_seconds": 2.0, "offers_ttl": 0,
    })
    ctx = AdapterContext(prefix=PREFIX, state_dir=tmp_path / "state", logs_dir=tmp_path / "logs", public_url="")
    adapter = AwsAdapter(settings, ctx)
    await adapter.start()
    yield adapter
    # clean up what the test made, then prove nothing else is left
    await admin(sim, "DELETE", "/_sim/faults")
    for instance in await adapter.list_instances():
        await adapter.terminate(instance.instance_id)
    for region in settings.regions:
        ec2 = client(sim, "ec2", region)
        for volume in (await call(ec2.describe_volumes))["Volumes"]:
            if any(t["Key"] == "gpuhop:role" and t["Value"] == "volume" for t in volume.get("Tags", [])):
                await adapter.delete_volume(volume["VolumeId"])
    rows = await wait_for(
        lambda: admin(sim, "GET", "/_sim/instances"),
        lambda data: all(r["state"] in ("terminated", "stopped") for r in data["instances"]),
    )
    assert not any(r["process_running"] for r in rows["instances"])
    for region in settings.regions:
        assert (await call(client(sim, "ec2", region).describe_volumes))["Volumes"] == []
    await adapter.close()


def offer_for(offers: list[Offer], instance_type: str, zone: str, capacity: CapacityType) -> Offer:
    return next(o for o in offers if o.offer_id == f"{instance_type}@{zone}@{capacity.value}")


def request(
    offer: Offer, job: str, attempt: int, command: list[str], volume: ProviderVolume | None = None,
    bid: float | None = None,
) -> LaunchRequest:
    name = attempt_name(PREFIX, job, attempt)
    return LaunchRequest(
        name=name, idempotency_key=f"{name}/{offer.offer_id}", job_id=job, attempt=attempt,
        offer=offer, image="python:3.11-slim", command=command,
        env={"GPUHOP_JOB_ID": job, "GPUHOP_ATTEMPT": str(attempt), "GREETING": "it's \"quoted\"\nand multi-line"},
        disk_gb=20, volume=volume, mount_path="/workspace", bid_price_per_hour=bid,
    )


async def observed(aws: AwsAdapter, instance_id: str) -> Instance | None:
    return next((i for i in await aws.list_instances() if i.instance_id == instance_id), None)


SLEEPER = ["python3", "-c", "import time; time.sleep(60)"]


async def test_offers_come_from_the_catalogue_and_live_spot_prices(aws: AwsAdapter, sim: AwsSimulator) -> None:
    offers = await aws.offers()
    spot = offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    assert (spot.gpu, spot.gpu_count, spot.vram_gb, spot.vcpu, spot.memory_gb) == ("A10G", 1, 24, 4, 16)
    assert spot.price_per_hour == pytest.approx(0.4121) and spot.region == "us-east-1a"
    on_demand = offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
    assert on_demand.price_per_hour == pytest.approx(1.006)
    h100 = offer_for(offers, "p5.48xlarge", "us-west-2b", CapacityType.SPOT)
    assert (h100.gpu, h100.gpu_count, h100.vram_gb) == ("H100-SXM", 8, 80)
    assert offer_for(offers, "p4d.24xlarge", "us-west-2a", CapacityType.SPOT).gpu == "A100-40GB"
    assert {o.region for o in offers} == {"us-east-1a", "us-east-1b", "us-west-2a", "us-west-2b"}
    assert len(offers) == 6 * 4 * 2

    await admin(sim, "POST", "/_sim/prices", {"instance_type": "g5.xlarge", "zone": "us-east-1a", "spot_price": 0.3})
    spot = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    assert spot.price_per_hour == pytest.approx(0.3)


async def test_launch_is_idempotent_by_name_and_token(aws: AwsAdapter) -> None:
    offer = offer_for(await aws.offers(), "g6.xlarge", "us-east-1b", CapacityType.SPOT)
    req = request(offer, "job1", 1, SLEEPER)
    first = await aws.launch(req)
    assert first.state is InstanceState.PENDING and first.name == "gh-job1-1" and first.region == "us-east-1b"
    again = await aws.launch(req)
    assert again.instance_id == first.instance_id
    running = await wait_for(lambda: observed(aws, first.instance_id), lambda i: i is not None and i.state is InstanceState.RUNNING)
    assert running is not None and running.extra["market"] == "spot" and running.price_per_hour == pytest.approx(offer.price_per_hour)
    assert (await aws.launch(req)).instance_id == first.instance_id
    assert [i.instance_id for i in await aws.list_instances()] == [first.instance_id]


async def test_volume_follows_the_job_from_attempt_to_attempt(aws: AwsAdapter, sim: AwsSimulator) -> None:
    volume = await aws.ensure_volume("job2-data", 50, "us-west-2a")
    assert (await aws.ensure_volume("job2-data", 50, "us-west-2a")).volume_id == volume.volume_id
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-west-2a", CapacityType.ON_DEMAND)
    script = (
        "import json, os, pathlib\n"
        "vol = pathlib.Path(os.environ['GPUHOP_VOLUME'])\n"
        "runs = vol / 'runs.txt'\n"
        "runs.write_text((runs.read_text() if runs.exists() else '') + os.environ['GPUHOP_ATTEMPT'] + '\\n')\n"
        "(vol / 'env.json').write_text(json.dumps(dict(os.environ)))\n"
    )
    volume_dir = sim.runtime.volume_dir(volume.volume_id)
    for attempt in (1, 2):
        launched = await aws.launch(request(offer, "job2", attempt, ["python3", "-c", script], volume=volume))
        # each listing attaches the volume once the instance runs; the job ends, the machine powers off
        ended = await wait_for(
            lambda i=launched: observed(aws, i.instance_id),
            lambda i: i is not None and i.state is InstanceState.TERMINATED, timeout=15,
        )
        assert ended is not None and ended.reason.startswith("Client.InstanceInitiatedShutdown")
        assert (volume_dir / "runs.txt").read_text().split() == [str(n) for n in range(1, attempt + 1)]
    env = json.loads((volume_dir / "env.json").read_text())
    assert env["GPUHOP_VOLUME"] == str(volume_dir)
    assert env["GREETING"] == "it's \"quoted\"\nand multi-line"
    assert (volume_dir / ".gpuhop" / "gh-job2-2.exit").exists()  # the agent's exit record


async def test_preemption_notice_is_polled_once_and_instance_ends_preempted(aws: AwsAdapter, sim: AwsSimulator, tmp_path: Path) -> None:
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    marker = tmp_path / "metadata-url"
    command = ["python3", "-c", f"import os, time; open({str(marker)!r}, 'w').write(os.environ['GPUHOP_METADATA_URL']); time.sleep(60)"]
    launched = await aws.launch(request(offer, "job3", 1, command))
    await wait_for(lambda: _exists(marker), bool)
    assert await aws.poll_interruptions(0) == []
    await admin(sim, "POST", f"/_sim/instances/{launched.instance_id}/interrupt", {"notice_seconds": 3})
    notices = await aws.poll_interruptions(3)
    assert [(n.instance_id, n.action) for n in notices] == [(launched.instance_id, "terminate")]
    assert await aws.poll_interruptions(0) == []
    status, text = await http_get(marker.read_text())
    assert status == 200 and json.loads(text)["action"] == "terminate"

    seen = await observed(aws, launched.instance_id)
    assert seen is not None and seen.state is InstanceState.RUNNING and seen.interruption_at == notices[0].deadline
    ended = await wait_for(
        lambda: observed(aws, launched.instance_id),
        lambda i: i is not None and i.state is InstanceState.PREEMPTED, timeout=NOTICE + 5,
    )
    assert ended is not None and "SpotInstanceTermination" in ended.reason and not ended.stopped_by_us


async def test_terminate_is_idempotent(aws: AwsAdapter) -> None:
    offer = offer_for(await aws.offers(), "g6e.xlarge", "us-west-2b", CapacityType.ON_DEMAND)
    req = request(offer, "job4", 1, SLEEPER)
    launched = await aws.launch(req)
    await aws.terminate(launched.instance_id)
    await aws.terminate(launched.instance_id)
    await aws.terminate("i-0123456789abcdef0")  # never existed: already gone
    ended = await wait_for(
        lambda: observed(aws, launched.instance_id),
        lambda i: i is not None and i.state is InstanceState.TERMINATED,
    )
    assert ended is not None and ended.stopped_by_us
    # the same attempt launched again: its ClientToken finds the ended instance, none is made
    assert (await aws.launch(req)).instance_id == launched.instance_id


async def test_error_mapping(aws: AwsAdapter, sim: AwsSimulator) -> None:
    offers = await aws.offers()
    spot = offer_for(offers, "g5.12xlarge", "us-east-1b", CapacityType.SPOT)
    await admin(sim, "POST", "/_sim/capacity", {"instance_type": "g5.12xlarge", "zone": "us-east-1b", "market": "spot", "capacity": 0})
    with pytest.raises(NoCapacity, match="InsufficientInstanceCapacity"):
        await aws.launch(request(spot, "job5", 1, SLEEPER))
    cheap = offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    with pytest.raises(NoCapacity, match="SpotMaxPriceTooLow"):
        await aws.launch(request(cheap, "job5", 2, SLEEPER, bid=0.01))

    await admin(sim, "POST", "/_sim/faults", {"code": "RequestLimitExceeded", "count": 2, "actions": ["DescribeInstances"]})
    assert await aws.list_instances() == []  # two throttled calls, retried with backoff
    await admin(sim, "POST", "/_sim/faults", {"code": "RequestLimitExceeded", "rate": 1.0})
    with pytest.raises(RetryLater):
        await aws.list_instances()
    await admin(sim, "DELETE", "/_sim/faults")
    await admin(sim, "POST", "/_sim/faults", {"code": "InternalError", "rate": 1.0, "actions": ["DescribeSpotPriceHistory"]})
    with pytest.raises(RetryLater):
        await aws.offers()
    await admin(sim, "DELETE", "/_sim/faults")

    await admin(sim, "POST", "/_sim/quota", {"region": "us-east-1", "market": "on-demand", "vcpus": 0})
    on_demand = offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
    with pytest.raises(PermanentError, match="VcpuLimitExceeded"):
        await aws.launch(request(on_demand, "job5", 3, SLEEPER))
    await admin(sim, "POST", "/_sim/faults", {"code": "AuthFailure", "count": 1, "message": "AWS was not able to validate the provided access credentials"})
    with pytest.raises(AuthError) as exc:
        await aws.list_instances()
    assert "testing" not in str(exc.value)
    volume = await aws.ensure_volume("job5-data", 10, "us-east-1a")
    with pytest.raises(PermanentError, match="is in us-east-1a"):
        await aws.launch(request(offer_for(offers, "g5.xlarge", "us-east-1b", CapacityType.SPOT), "job5", 4, SLEEPER, volume=volume))


async def _exists(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0
