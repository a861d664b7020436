"""Rebalance recommendations (issue 10, item 11): EC2 tells, over EventBridge and at IMDS
`events/recommendations/rebalance`, that a spot instance is at elevated risk of interruption.
With `rebalance_notices = true` the adapter delivers it through the interruption channel (action
"rebalance") so the engine launches the replacement early and hands over; by default it is left
out of the rule's pattern. A rebalance is not a reclaim: the instance is not judged preempted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.aws.interruptions import REBALANCE, rule_name
from orchestrator.agent import MetadataReader
from orchestrator.models import CapacityType, InstanceState
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


async def _launch_running(aws: AwsAdapter, job: str) -> str:
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    launched = await aws.launch(request(offer, job, 1, SLEEPER))
    await wait_for(aws.list_instances, lambda xs: any(i.instance_id == launched.instance_id and i.state is InstanceState.RUNNING for i in xs), timeout=15)
    return launched.instance_id


async def test_a_rebalance_recommendation_is_an_early_notice_when_enabled(sim: AwsSimulator, tmp_path: Path) -> None:
    """Before the fix the rule matched spot warnings only: nothing arrived."""
    aws = make_adapter(sim, tmp_path, rebalance_notices=True)
    try:
        await aws.start()
        iid = await _launch_running(aws, "rb1")
        answer = await admin(sim, "POST", f"/_sim/instances/{iid}/rebalance")
        assert answer["rebalance"]["noticeTime"].endswith("Z")
        url = f"{sim.url}/_sim/metadata/{iid}/latest/meta-data/events/recommendations/rebalance"
        body = await asyncio.to_thread(MetadataReader(url).read)
        assert body is not None and "noticeTime" in json.loads(body)

        notices = await aws.poll_interruptions(5)
        assert [(n.instance_id, n.action) for n in notices] == [(iid, REBALANCE)]
        assert notices[0].deadline > notices[0].received  # no reclaim before a warning and its 2 minutes
        listed = {i.instance_id: i for i in await aws.list_instances()}
        assert listed[iid].interruption_at is None  # a hint, not a reclaim notice

        # the reclaim, if it comes, is still a reclaim
        await admin(sim, "POST", f"/_sim/instances/{iid}/interrupt", {"notice_seconds": 0.5})
        warned = await aws.poll_interruptions(5)
        assert [(n.instance_id, n.action) for n in warned] == [(iid, "terminate")]
        ended = await wait_for(aws.list_instances, lambda xs: any(i.instance_id == iid and i.state is InstanceState.PREEMPTED for i in xs), timeout=15)
        assert ended
    finally:
        await clean_up(aws, sim)


async def test_rebalance_recommendations_are_left_out_by_default(sim: AwsSimulator, tmp_path: Path) -> None:
    aws = make_adapter(sim, tmp_path)
    try:
        await aws.start()
        rule = await call(client(sim, "events").describe_rule, Name=rule_name(aws.settings.interruption_queue))
        assert json.loads(rule["EventPattern"])["detail-type"] == ["EC2 Spot Instance Interruption Warning"]
        iid = await _launch_running(aws, "rb2")
        await admin(sim, "POST", f"/_sim/instances/{iid}/rebalance")
        assert await aws.poll_interruptions(1) == []
        listed = {i.instance_id: i for i in await aws.list_instances()}
        assert listed[iid].state is InstanceState.RUNNING
    finally:
        await clean_up(aws, sim)


async def test_the_simulator_recommends_rebalance_for_spot_only(sim: AwsSimulator, tmp_path: Path) -> None:
    aws = make_adapter(sim, tmp_path, interruption_notices=False)
    try:
        offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
        launched = await aws.launch(request(offer, "rb3", 1, SLEEPER))
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sim.url}/_sim/instances/{launched.instance_id}/rebalance") as resp:
                assert resp.status == 409
    finally:
        await clean_up(aws, sim)
