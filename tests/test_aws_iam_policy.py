"""deploy/aws-iam-policy.json is exactly what the daemon needs (issue 10, item 12): every boto3
operation the adapter issues through a full run against the simulator (check-config, start-up,
offers, a volume, a launch, attachment, a spot warning, a rebalance hint, the reclaim, the
console, termination, a token retry, a quota refusal, deletion) is recorded with a botocore
`before-parameter-build` hook on every session the adapter opens, mapped to its IAM action (plus what EC2
does on the caller's behalf: tags at creation, the AMI's SSM parameter, passing the instance
role), and must be allowed by the policy; and the policy grants nothing the run did not use.

The evaluator matches actions and resource ARNs (SQS queue, EventBridge rule) and treats
conditions as met: it proves the policy's coverage and minimality, not IAM's condition logic."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest

from adapters.aws import AwsAdapter
from adapters.aws import client as aws_client
from adapters.aws.client import QuotaExceeded
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
    wait_for,
)

POLICY = Path(__file__).resolve().parents[1] / "deploy" / "aws-iam-policy.json"
# an operation whose IAM action has another name
RENAMED = {"sqs:DeleteMessageBatch": "sqs:DeleteMessage", "sqs:SendMessageBatch": "sqs:SendMessage",
           "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility"}
NO_PERMISSION = {"sts:GetCallerIdentity"}  # needs none


@dataclasses.dataclass(frozen=True)
class Use:
    action: str
    resource: str  # an ARN, or "*" where the evaluator does not check resources


class Recorder:
    def __init__(self) -> None:
        self.uses: set[Use] = set()

    def __call__(self, model: Any, params: dict[str, Any], context: Any = None, **_: Any) -> None:
        service = model.service_model
        prefix = str(service.metadata.get("signingName") or service.endpoint_prefix)
        action = RENAMED.get(f"{prefix}:{model.name}", f"{prefix}:{model.name}")
        region = str((context or {}).get("client_region") or "*")
        self.uses.add(Use(action, _resource(prefix, params, region)))
        if model.name in ("RunInstances", "CreateVolume") and params.get("TagSpecifications"):
            self.uses.add(Use("ec2:CreateTags", "*"))  # tagging at creation is authorized as CreateTags
        if model.name == "RunInstances":
            if str(params.get("ImageId", "")).startswith("resolve:ssm:"):
                name = str(params["ImageId"]).removeprefix("resolve:ssm:")
                self.uses.add(Use("ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{name}"))
            if params.get("IamInstanceProfile"):
                self.uses.add(Use("iam:PassRole", "arn:aws:iam::123456789012:role/gpuhop-job"))


def _resource(prefix: str, params: dict[str, Any], region: str) -> str:
    if prefix == "sqs":
        name = str(params.get("QueueName") or str(params.get("QueueUrl", "")).rstrip("/").rsplit("/", 1)[-1])
        return f"arn:aws:sqs:{region}:123456789012:{name}"
    if prefix == "events":
        return f"arn:aws:events:{region}:123456789012:rule/{params.get('Name') or params.get('Rule')}"
    return "*"


def allowed(policy: dict[str, Any], use: Use) -> bool:
    def matches(patterns: str | list[str], value: str, case: bool) -> bool:
        items = [patterns] if isinstance(patterns, str) else patterns
        return any(fnmatchcase(value if case else value.lower(), p if case else p.lower()) for p in items)

    statements = [s for s in policy["Statement"]
                  if matches(s["Action"], use.action, False) and (use.resource == "*" or matches(s["Resource"], use.resource, True))]
    return any(s["Effect"] == "Allow" for s in statements) and not any(s["Effect"] == "Deny" for s in statements)


def granted(policy: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for statement in policy["Statement"]:
        actions = statement["Action"]
        out.update([actions] if isinstance(actions, str) else actions)
    return out


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator


async def observed(aws: AwsAdapter, instance_id: str) -> Instance | None:
    return next((i for i in await aws.list_instances() if i.instance_id == instance_id), None)


async def test_the_shipped_policy_allows_every_call_and_nothing_more(
    sim: AwsSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()

    class RecordingSession(boto3.session.Session):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.events.register("before-parameter-build", recorder)

    monkeypatch.setattr(aws_client.boto3.session, "Session", RecordingSession)
    tagged = (await call(client(sim, "ec2").describe_subnets, Filters=[{"Name": "availability-zone", "Values": ["us-east-1a"]}]))["Subnets"][0]
    await call(client(sim, "ec2").create_tags, Resources=[tagged["SubnetId"]], Tags=[{"Key": "gpuhop", "Value": "1"}])
    iam = client(sim, "iam")
    await call(iam.create_role, RoleName="gpuhop-job", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
    await call(iam.create_instance_profile, InstanceProfileName="gpuhop-job")
    await call(iam.add_role_to_instance_profile, InstanceProfileName="gpuhop-job", RoleName="gpuhop-job")
    aws = make_adapter(sim, tmp_path, subnet_tag="gpuhop", rebalance_notices=True, instance_profile="gpuhop-job")
    try:
        assert "credentials ok" in await aws.verify()
        await aws.start()
        offers = await aws.offers()
        offer = offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.SPOT)
        volume = await aws.ensure_volume("iam-data", 10, "us-east-1a")
        launched = await aws.launch(request(offer, "iam1", 1, SLEEPER, volume=volume))
        await wait_for(partial(observed, aws, launched.instance_id),
                       lambda i: i is not None and i.state is InstanceState.RUNNING and "volume_id" in i.extra, timeout=15)
        await wait_for(lambda: admin(sim, "GET", "/_sim/instances"),
                       lambda d: any(r["job_started"] for r in d["instances"]), timeout=15)
        await admin(sim, "POST", f"/_sim/instances/{launched.instance_id}/rebalance")
        await admin(sim, "POST", f"/_sim/instances/{launched.instance_id}/interrupt", {"notice_seconds": 0.5})
        seen: list[str] = []
        await wait_for(lambda: aws.poll_interruptions(2), lambda ns: bool(seen.extend(n.action for n in ns)) or "terminate" in seen, timeout=20)
        await wait_for(partial(observed, aws, launched.instance_id),
                       lambda i: i is not None and i.state is InstanceState.PREEMPTED and i.extra["ec2_state"] == "terminated", timeout=15)
        # a retry under the same token with another price: looked up by its ClientToken
        moved = dataclasses.replace(offer, price_per_hour=offer.price_per_hour * 2)
        assert (await aws.launch(request(moved, "iam1", 1, SLEEPER, volume=volume))).instance_id == launched.instance_id
        # a volume deleted while attached is detached first
        held = await aws.ensure_volume("iam-held", 10, "us-east-1a")
        second = await aws.launch(request(offer_for(offers, "g6.xlarge", "us-east-1a", CapacityType.ON_DEMAND), "iam2", 1, SLEEPER, volume=held))

        async def attached() -> Any:
            await aws.list_instances()  # each listing attaches volumes to running instances
            return await admin(sim, "GET", "/_sim/instances")

        await wait_for(attached, lambda d: any(r["instance_id"] == second.instance_id and r["job_started"] for r in d["instances"]), timeout=15)
        await aws.delete_volume(held.volume_id)
        await aws.terminate(second.instance_id)
        await admin(sim, "POST", "/_sim/quota", {"region": "us-west-2", "market": "on-demand", "vcpus": 0})
        with pytest.raises(QuotaExceeded):
            await aws.launch(request(offer_for(offers, "g5.xlarge", "us-west-2a", CapacityType.ON_DEMAND), "iam3", 1, SLEEPER))
        await aws.delete_volume(volume.volume_id)
    finally:
        await clean_up(aws, sim)

    policy = json.loads(POLICY.read_text())
    used = {u for u in recorder.uses if u.action not in NO_PERMISSION}
    refused = sorted(f"{u.action} on {u.resource}" for u in used if not allowed(policy, u))
    assert not refused, f"the policy does not allow: {refused}"
    unused = granted(policy) - {u.action for u in used}
    assert not unused, f"the policy grants what the daemon never uses: {sorted(unused)}"
    # the run covered what it set out to (a recorder that saw nothing would prove nothing)
    assert {"ec2:RunInstances", "ec2:AttachVolume", "sqs:ReceiveMessage", "sqs:DeleteMessage",
            "servicequotas:GetServiceQuota", "ec2:DescribeRegions"} <= {u.action for u in used}


def test_the_evaluator_refuses_what_the_policy_does_not_name() -> None:
    policy = json.loads(POLICY.read_text())
    assert allowed(policy, Use("ec2:RunInstances", "*"))
    assert not allowed(policy, Use("ec2:ModifyInstanceAttribute", "*"))
    assert not allowed(policy, Use("sqs:ReceiveMessage", "arn:aws:sqs:us-east-1:123456789012:someone-elses"))
    assert allowed(policy, Use("sqs:ReceiveMessage", "arn:aws:sqs:us-east-1:123456789012:gpuhop-interruptions"))
