"""The AWS simulator seen through boto3 over HTTP: what moto lacks (prices, capacity, zone checks,
idempotency, spot interruptions, instances that run their job, billing) behaves as EC2 does."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from simulators.aws import AwsSimulator
from tests.aws_fixtures import (
    NOTICE,
    admin,
    call,
    client,
    describe_instance,
    http_get,
    running_simulator,
    wait_for,
)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator


def job_user_data(command: str, volume_id: str | None = None) -> str:
    env = {"JOB_GREETING": "hi", "GPUHOP_METADATA_URL": "http://169.254.169.254/latest/meta-data/spot/instance-action"}
    doc = {"version": 1, "image": "python:3.11-slim", "command": command, "env": env,
           "mount_path": "/workspace", "volume_id": volume_id}
    line = base64.b64encode(json.dumps(doc).encode()).decode()
    return f"#!/bin/bash\n# gpuhop-job: {line}\nexit 0\n"


def run(ec2: Any, zone: str = "us-east-1a", market: str = "spot", **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "ImageId": "ami-12345678", "InstanceType": "g5.xlarge", "MinCount": 1, "MaxCount": 1,
        "Placement": {"AvailabilityZone": zone},
        "TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "sim-test"}]}],
    }
    if market == "spot":
        params["InstanceMarketOptions"] = {"MarketType": "spot"}
    params.update(extra)
    instance: dict[str, Any] = ec2.run_instances(**params)["Instances"][0]
    return instance


def code_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = exc.value.response
    return str(response["Error"]["Code"]), int(response["ResponseMetadata"]["HTTPStatusCode"])


async def test_spot_price_history_returns_catalogue_prices(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    rows = (await call(ec2.describe_spot_price_history, InstanceTypes=["g5.xlarge"], StartTime=time.time()))["SpotPriceHistory"]
    assert {(r["AvailabilityZone"], r["SpotPrice"]) for r in rows} == {("us-east-1a", "0.412100"), ("us-east-1b", "0.447700")}
    west = client(sim, "ec2", "us-west-2")
    rows = (await call(west.describe_spot_price_history, InstanceTypes=["p5.48xlarge"]))["SpotPriceHistory"]
    assert {r["AvailabilityZone"] for r in rows} == {"us-west-2a", "us-west-2b"}

    await admin(sim, "POST", "/_sim/prices", {"instance_type": "g5.xlarge", "zone": "us-east-1a", "spot_price": 0.5})
    rows = (await call(ec2.describe_spot_price_history, InstanceTypes=["g5.xlarge"], AvailabilityZone="us-east-1a"))["SpotPriceHistory"]
    assert [r["SpotPrice"] for r in rows] == ["0.500000", "0.412100"]  # newest first, with history
    rows = (await call(ec2.describe_spot_price_history, InstanceTypes=["g5.xlarge"], AvailabilityZone="us-east-1a", StartTime=time.time()))["SpotPriceHistory"]
    assert [r["SpotPrice"] for r in rows] == ["0.500000"]


async def test_capacity_runs_out_and_comes_back(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    await admin(sim, "POST", "/_sim/capacity", {"instance_type": "g5.xlarge", "zone": "us-east-1a", "market": "spot", "capacity": 1})
    first = await call(run, ec2=ec2)
    assert first["State"]["Name"] == "pending"
    with pytest.raises(ClientError) as exc:
        await call(run, ec2=ec2)
    assert code_of(exc) == ("InsufficientInstanceCapacity", 500)
    await call(run, ec2=ec2, market="on-demand")  # another market has its own capacity

    await call(ec2.terminate_instances, InstanceIds=[first["InstanceId"]])
    await wait_for(lambda: describe_instance(ec2, first["InstanceId"]), lambda i: i["State"]["Name"] == "terminated")
    await call(run, ec2=ec2)  # the capacity was given back


async def test_spot_max_price_too_low_and_unsupported(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    with pytest.raises(ClientError) as exc:
        await call(run, ec2=ec2, InstanceMarketOptions={"MarketType": "spot", "SpotOptions": {"MaxPrice": "0.1"}})
    assert code_of(exc)[0] == "SpotMaxPriceTooLow"
    await call(run, ec2=ec2, InstanceMarketOptions={"MarketType": "spot", "SpotOptions": {"MaxPrice": "0.5"}})
    with pytest.raises(ClientError) as exc:
        await call(run, ec2=ec2, InstanceType="t2.micro")
    assert code_of(exc)[0] == "Unsupported"


async def test_attach_checks_zone_and_double_attachment(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    a = await call(run, ec2=ec2, zone="us-east-1a")
    b = await call(run, ec2=ec2, zone="us-east-1a")
    for instance in (a, b):
        await wait_for(partial(describe_instance, ec2, instance["InstanceId"]), lambda i: i["State"]["Name"] == "running")
    far = await call(ec2.create_volume, AvailabilityZone="us-east-1b", Size=10)
    with pytest.raises(ClientError) as exc:
        await call(ec2.attach_volume, VolumeId=far["VolumeId"], InstanceId=a["InstanceId"], Device="/dev/sdf")
    assert code_of(exc) == ("InvalidVolume.ZoneMismatch", 400)

    near = await call(ec2.create_volume, AvailabilityZone="us-east-1a", Size=10)
    await call(ec2.attach_volume, VolumeId=near["VolumeId"], InstanceId=a["InstanceId"], Device="/dev/sdf")
    with pytest.raises(ClientError) as exc:
        await call(ec2.attach_volume, VolumeId=near["VolumeId"], InstanceId=b["InstanceId"], Device="/dev/sdf")
    assert code_of(exc) == ("VolumeInUse", 400)


async def test_client_token_is_idempotent(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    first = await call(run, ec2=ec2, ClientToken="gh-job1-1/token")
    again = await call(run, ec2=ec2, ClientToken="gh-job1-1/token")
    assert again["InstanceId"] == first["InstanceId"]
    with pytest.raises(ClientError) as exc:
        await call(run, ec2=ec2, ClientToken="gh-job1-1/token", zone="us-east-1b")
    assert code_of(exc)[0] == "IdempotentParameterMismatch"
    listed = await call(ec2.describe_instances)
    assert sum(len(r["Instances"]) for r in listed["Reservations"]) == 1


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_interruption_warning_metadata_and_reclaim(sim: AwsSimulator, tmp_path: Path) -> None:
    ec2, sqs, events = client(sim, "ec2"), client(sim, "sqs"), client(sim, "events")
    queue = (await call(sqs.create_queue, QueueName="warnings"))["QueueUrl"]
    arn = (await call(sqs.get_queue_attributes, QueueUrl=queue, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    pattern = {"source": ["aws.ec2"], "detail-type": ["EC2 Spot Instance Interruption Warning"]}
    await call(events.put_rule, Name="spot", EventPattern=json.dumps(pattern))
    await call(events.put_targets, Rule="spot", Targets=[{"Id": "q", "Arn": arn}])

    out = tmp_path / "metadata-url"
    command = f"printf %s \"$GPUHOP_METADATA_URL\" > {out}; trap 'echo term' TERM; sleep 30 & wait"
    instance = await call(run, ec2=ec2, UserData=job_user_data(command))
    iid = instance["InstanceId"]
    await wait_for(lambda: _read(out), bool)
    url = out.read_text()
    assert (await http_get(url))[0] == 404

    warned = time.time()
    notice = await admin(sim, "POST", f"/_sim/instances/{iid}/interrupt", {})
    assert notice["notice"]["action"] == "terminate"
    status, text = await http_get(url)
    assert status == 200 and json.loads(text) == notice["notice"]
    # the reclaim is the warning's time + the configured notice (EC2's: + 2 min), in whole seconds
    action_at = _epoch(notice["notice"]["time"])
    assert int(warned + NOTICE) <= action_at <= time.time() + NOTICE
    messages = (await call(sqs.receive_message, QueueUrl=queue, WaitTimeSeconds=2))["Messages"]
    event = json.loads(messages[0]["Body"])
    assert event["source"] == "aws.ec2" and event["detail-type"] == "EC2 Spot Instance Interruption Warning"
    assert event["detail"] == {"instance-id": iid, "instance-action": "terminate"}
    # a client reckons the reclaim as the event's time + EC2's two minutes: the same moment
    assert _epoch(event["time"]) + 120 == action_at
    assert (await describe_instance(ec2, iid))["State"]["Name"] == "running"  # still, during the notice

    ended = await wait_for(lambda: describe_instance(ec2, iid), lambda i: i["State"]["Name"] == "terminated", timeout=NOTICE + 5)
    assert ended["StateReason"]["Code"] == "Server.SpotInstanceTermination"
    assert not sim.runtime.running(iid)


async def test_job_runs_then_instance_shuts_down_and_ledger_bills(sim: AwsSimulator, tmp_path: Path) -> None:
    ec2 = client(sim, "ec2")
    out = tmp_path / "greeting"
    instance = await call(
        run, ec2=ec2, market="on-demand", UserData=job_user_data(f"echo $JOB_GREETING > {out}"),
        InstanceInitiatedShutdownBehavior="terminate",
    )
    volume = await call(ec2.create_volume, AvailabilityZone="us-east-1a", Size=100)
    ended = await wait_for(lambda: describe_instance(ec2, instance["InstanceId"]), lambda i: i["State"]["Name"] == "terminated")
    assert ended["StateReason"]["Code"] == "Client.InstanceInitiatedShutdown"
    assert out.read_text().strip() == "hi"

    ledger = await admin(sim, "GET", "/_sim/ledger")
    rows = {r["id"]: r for r in ledger["entries"]}
    assert rows[instance["InstanceId"]]["price_per_hour"] == 1.006 and not rows[instance["InstanceId"]]["running"]
    # EC2's rule: per second, at least 60, between the times the API reports
    assert rows[instance["InstanceId"]]["billed_seconds"] == 60
    assert rows[instance["InstanceId"]]["cost_usd"] == pytest.approx(60 * 1.006 / 3600, abs=1e-6)
    assert rows[instance["InstanceId"]]["started"] == ended["LaunchTime"].timestamp()
    assert ended["StateTransitionReason"].endswith(
        time.strftime("(%Y-%m-%d %H:%M:%S GMT)", time.gmtime(rows[instance["InstanceId"]]["stopped"]))
    )
    assert rows[volume["VolumeId"]]["kind"] == "volume" and rows[volume["VolumeId"]]["running"]
    assert ledger["total_usd"] > 0
    await call(ec2.delete_volume, VolumeId=volume["VolumeId"])
    ledger = await admin(sim, "GET", "/_sim/ledger")
    assert not {r["id"]: r for r in ledger["entries"]}[volume["VolumeId"]]["running"]


async def test_injected_faults(sim: AwsSimulator) -> None:
    ec2 = client(sim, "ec2")
    await admin(sim, "POST", "/_sim/faults", {"code": "RequestLimitExceeded", "count": 1, "actions": ["DescribeInstances"]})
    await call(ec2.describe_spot_price_history, InstanceTypes=["g5.xlarge"])  # another action: unaffected
    with pytest.raises(ClientError) as exc:
        await call(ec2.describe_instances)
    assert code_of(exc) == ("RequestLimitExceeded", 503)
    await call(ec2.describe_instances)  # the fault was used up

    await admin(sim, "POST", "/_sim/faults", {"code": "timeout", "count": 1, "delay": 2.0})
    impatient = boto3.client(
        "ec2", endpoint_url=sim.url, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=0.3),
    )
    with pytest.raises(ReadTimeoutError):
        await call(impatient.describe_instances)


async def test_a_slow_launch_is_carried_out_after_the_client_gave_up(sim: AwsSimulator) -> None:
    await admin(sim, "POST", "/_sim/faults", {"code": "latency", "count": 1, "delay": 1.5, "actions": ["RunInstances"]})
    impatient = boto3.client(
        "ec2", endpoint_url=sim.url, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=0.3),
    )
    with pytest.raises(ReadTimeoutError):
        await call(run, ec2=impatient)
    ec2 = client(sim, "ec2")
    listed = await wait_for(
        lambda: call(ec2.describe_instances), lambda answer: bool(answer["Reservations"]), timeout=15,
    )
    assert listed["Reservations"][0]["Instances"][0]["Tags"] == [{"Key": "Name", "Value": "sim-test"}]


async def test_faults_reach_sqs_and_eventbridge_when_asked(sim: AwsSimulator) -> None:
    sqs, events = client(sim, "sqs"), client(sim, "events")
    await admin(sim, "POST", "/_sim/faults", {"code": "AccessDenied", "count": 1, "services": ["sqs"], "echo_credentials": True})
    await call(client(sim, "ec2").describe_instances)  # EC2 is not affected
    with pytest.raises(ClientError) as exc:
        await call(sqs.create_queue, QueueName="q")
    assert code_of(exc) == ("AccessDenied", 403)
    assert "testing" in exc.value.response["Error"]["Message"]  # the access key id, echoed
    await call(sqs.create_queue, QueueName="q")
    await admin(sim, "POST", "/_sim/faults", {"code": "InternalError", "count": 1, "services": ["events"], "actions": ["PutRule"]})
    with pytest.raises(ClientError) as exc:
        await call(events.put_rule, Name="r", EventPattern="{}")
    assert code_of(exc) == ("InternalError", 500)


async def test_two_simulators_do_not_share_state(sim: AwsSimulator, tmp_path: Path) -> None:
    async with running_simulator(tmp_path / "other") as other:
        await call(run, ec2=client(sim, "ec2"))
        listed = await call(client(other, "ec2").describe_instances)
        assert listed["Reservations"] == []


async def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
