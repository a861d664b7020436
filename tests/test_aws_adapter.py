"""The AWS adapter against the AWS simulator: offers, idempotent launches, volumes that follow a
job between attempts, state normalization (incl. PREEMPTED), spot warnings, and error mapping.
Each test must leave no instance, volume or process behind that it did not create itself."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.base import AuthError, NoCapacity, PermanentError, RetryLater
from orchestrator.agent import MetadataReader
from orchestrator.models import (
    CapacityType,
    Instance,
    InstanceState,
)
from simulators.aws import AwsSimulator
from tests.aws_fixtures import (
    NOTICE,
    SLEEPER,
    admin,
    clean_up,
    http_get,
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
        # each listing attaches the volume once the instance runs; the job ends, the machine powers
        # off, and the agent's exit line on the console tells how the job ended
        ended = await wait_for(
            partial(observed, aws, launched.instance_id),
            lambda i: i is not None and i.extra["ec2_state"] == "terminated", timeout=15,
        )
        assert ended is not None and ended.reason.startswith("Client.InstanceInitiatedShutdown")
        assert (ended.state, ended.exit_code, ended.exit_signal) == (InstanceState.EXITED, 0, None)
        assert (volume_dir / "runs.txt").read_text().split() == [str(n) for n in range(1, attempt + 1)]
    env = json.loads((volume_dir / "env.json").read_text())
    assert env["GPUHOP_VOLUME"] == str(volume_dir)
    assert env["GREETING"] == "it's \"quoted\"\nand multi-line"
    assert (volume_dir / ".gpuhop" / "gh-job2-2.exit").exists()  # the agent's exit record


async def test_a_machine_waiting_for_its_volume_is_not_running_yet(aws: AwsAdapter, sim: AwsSimulator) -> None:
    """The next attempt's instance can run while the previous one still holds the volume (EC2
    keeps a reclaimed spot machine for its two minutes of notice). Its job cannot start before
    the volume is attached, so the listing says pending, with why, not running: the engine
    does not count the agent's silence against it. Once the holder is gone, it attaches and
    runs."""
    volume = await aws.ensure_volume("job9-data", 10, "us-east-1a")
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
    first = await aws.launch(request(offer, "job9", 1, SLEEPER, volume=volume))
    await wait_for(partial(observed, aws, first.instance_id),
                   lambda i: i is not None and i.state == InstanceState.RUNNING, timeout=15)
    second = await aws.launch(request(offer, "job9", 2, SLEEPER, volume=volume))
    waiting = await wait_for(partial(observed, aws, second.instance_id),
                             lambda i: i is not None and i.extra["ec2_state"] == "running", timeout=15)
    assert waiting is not None and waiting.state == InstanceState.PENDING
    assert volume.volume_id in waiting.reason and "waiting for its volume" in waiting.reason
    await aws.terminate(first.instance_id)
    running = await wait_for(partial(observed, aws, second.instance_id),
                             lambda i: i is not None and i.state == InstanceState.RUNNING, timeout=30)
    assert running is not None and not running.reason


async def test_preemption_notice_is_polled_once_and_instance_ends_preempted(aws: AwsAdapter, sim: AwsSimulator, tmp_path: Path) -> None:
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    marker = tmp_path / "started"
    command = ["python3", "-c", f"import time; open({str(marker)!r}, 'w').write('yes'); time.sleep(60)"]
    launched = await aws.launch(request(offer, "job3", 1, command))
    await wait_for(lambda: _exists(marker), bool)
    # the agent (not the job) watches the instance metadata; the simulator points it at its own
    job = sim.fleet.instances[launched.instance_id].job
    assert job is not None and job.env["GPUHOP_METADATA_URL"].startswith("http://169.254.169.254/")
    metadata_url = f"{sim.url}/_sim/metadata/{launched.instance_id}/latest/meta-data/spot/instance-action"
    assert await aws.poll_interruptions(0) == []
    await admin(sim, "POST", f"/_sim/instances/{launched.instance_id}/interrupt", {"notice_seconds": 3})
    notices = await aws.poll_interruptions(3)
    assert [(n.instance_id, n.action) for n in notices] == [(launched.instance_id, "terminate")]
    assert await aws.poll_interruptions(0) == []
    assert (await http_get(metadata_url))[0] == 401  # launched IMDSv2-only: no token, no answer
    text = await asyncio.to_thread(MetadataReader(metadata_url).read)
    assert text is not None and json.loads(text)["action"] == "terminate"
    # the reclaim the adapter reckons (the warning's time + EC2's 2 min) is the one the machine is told
    action_at = datetime.fromisoformat(json.loads(text)["time"].replace("Z", "+00:00"))
    assert notices[0].deadline == action_at

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
    runs = sim.ec2.calls["RunInstances"]
    with pytest.raises(NoCapacity, match="InsufficientInstanceCapacity"):
        await aws.launch(request(spot, "job5", 1, SLEEPER))
    assert sim.ec2.calls["RunInstances"] == runs + 1  # an answer (EC2 sends it as a 500), not retried
    # no MaxPrice is sent (a bid is ignored): spot is capped at the on-demand price, EC2's default
    await admin(sim, "POST", "/_sim/prices", {"instance_type": "g5.xlarge", "zone": "us-east-1a", "spot_price": 1.5})
    dear = offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    with pytest.raises(NoCapacity, match="SpotMaxPriceTooLow"):
        await aws.launch(request(dear, "job5", 2, SLEEPER, bid=0.01))

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
    with pytest.raises(AuthError, match="AuthFailure"):
        await aws.list_instances()  # credentials in messages: test_credentials_never_reach_messages_or_logs
    volume = await aws.ensure_volume("job5-data", 10, "us-east-1a")
    with pytest.raises(PermanentError, match="is in us-east-1a"):
        await aws.launch(request(offer_for(offers, "g5.xlarge", "us-east-1b", CapacityType.SPOT), "job5", 4, SLEEPER, volume=volume))


async def _exists(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


ACCESS_KEY = "gpuhop-test-access-key-7f3a"
SECRET_KEY = "gpuhop-test-secret-9c4e/+x"
SESSION_TOKEN = "gpuhop-test-session-token-b51d"


async def test_credentials_never_reach_messages_or_logs(
    sim: AwsSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint (or a proxy in front of it) that echoes the caller's credentials in its error
    text: the access key id and session token travel with every request, and the secret is put
    into the message by the rule itself, as a proxy that logged the whole signing input could."""
    aws = make_adapter(
        sim, tmp_path, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, session_token=SESSION_TOKEN,
    )
    try:
        offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
        launched = await aws.launch(request(offer, "job6", 1, ["true"]))
        await wait_for(
            lambda: observed(aws, launched.instance_id),
            lambda i: i is not None and i.extra["ec2_state"] == "terminated" and i.exit_code == 0, timeout=15,
        )
        echo = {"rate": 1.0, "echo_credentials": True, "message": f"denied; secret was {SECRET_KEY}"}

        await admin(sim, "POST", "/_sim/faults", {**echo, "code": "AuthFailure", "actions": ["DescribeInstances"]})
        with pytest.raises(AuthError) as raised:
            await aws.list_instances()
        shown = "".join(traceback.format_exception(raised.value))
        assert "<redacted>" in str(raised.value)  # the credentials did reach the message...
        for secret in (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN):  # ...and left it removed
            assert secret not in shown
        await admin(sim, "DELETE", "/_sim/faults")

        # a failure the adapter only logs: reading the console of an ended instance
        second = await aws.launch(request(offer, "job6", 2, ["true"]))
        await wait_for(
            lambda: admin(sim, "GET", "/_sim/instances"),
            lambda d: any(r["instance_id"] == second.instance_id and r["state"] == "terminated" for r in d["instances"]),
            timeout=15,
        )
        await admin(sim, "POST", "/_sim/faults", {**echo, "code": "InternalError", "actions": ["GetConsoleOutput"]})
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="adapters"):
            listed = {i.instance_id: i for i in await aws.list_instances()}
        assert listed[second.instance_id].exit_code is None  # the console could not be read
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("adapters"))
        assert "<redacted>" in logged
        for secret in (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN):
            assert secret not in logged
    finally:
        await clean_up(aws, sim)
