"""What an EC2 instance costs, as the adapter reads it from EC2's own times (LaunchTime, the
state transition, the spot price history) and as the simulator's ledger charges it: per second,
at least 60 s, at the spot price in force. The two are written apart and must agree."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.aws import billing as adapter_billing
from orchestrator.models import Bill, CapacityType, Instance
from simulators.aws import AwsSimulator
from simulators.aws import billing as sim_billing
from tests.aws_fixtures import (
    SLEEPER,
    admin,
    clean_up,
    make_adapter,
    offer_for,
    request,
    running_simulator,
    wait_for,
)

LONGER = ["python3", "-c", "import time; time.sleep(600)"]


def test_the_rule_on_paper() -> None:
    steps = [(0.0, 3.6), (1_000.0, 7.2)]  # USD/hour: 0.001 then 0.002 per second
    for charge in (adapter_billing.charge, sim_billing.cost):
        assert charge(100.0, 112.0, steps) == pytest.approx(0.06)  # 12 s billed as 60
        assert charge(900.0, 1_100.0, steps) == pytest.approx(100 * 0.001 + 100 * 0.002)
        assert charge(990.0, 1_000.0, steps) == pytest.approx(10 * 0.001 + 50 * 0.002)  # the minimum spans the change
    assert adapter_billing.parse_transition_time("User initiated (2026-01-02 03:04:05 GMT)") == 1767323045.0
    assert adapter_billing.parse_transition_time("Server.SpotInstanceTermination") is None


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


async def _by_id(aws: AwsAdapter) -> dict[str, Instance]:
    return {i.instance_id: i for i in await aws.list_instances()}


async def _after(moment: float) -> bool:
    return time.time() >= moment


async def _pass(seconds: float) -> None:
    """Let at least `seconds` of wall-clock time go by (billing works in whole seconds)."""
    moment = time.time() + seconds
    await wait_for(lambda: _after(moment), bool)


async def _set_spot(sim: AwsSimulator, instance_type: str, zone: str, price: float) -> None:
    await admin(sim, "POST", "/_sim/prices", {"instance_type": instance_type, "zone": zone, "spot_price": price})


async def test_bills_from_ec2_times_agree_with_the_ledger(aws: AwsAdapter, sim: AwsSimulator) -> None:
    offers = await aws.offers()
    short = await aws.launch(request(offer_for(offers, "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND), "bill", 1, ["true"]))
    spot = await aws.launch(request(offer_for(offers, "g6.xlarge", "us-east-1b", CapacityType.SPOT), "bill", 2, SLEEPER))
    long = await aws.launch(request(offer_for(offers, "g5.xlarge", "us-west-2a", CapacityType.SPOT), "bill", 3, LONGER))
    live = await wait_for(
        lambda: _by_id(aws),
        lambda seen: all(seen[i.instance_id].bill is not None for i in (spot, long)),
    )
    spot_bill, long_bill = live[spot.instance_id].bill, live[long.instance_id].bill
    assert spot_bill is not None and long_bill is not None and spot_bill.ended_at is None
    assert spot_bill.cost_usd == pytest.approx(60 * 0.3312 / 3600)  # the minimum, while it runs

    # prices move while both run: each change in force from its own second on
    await wait_for(lambda: _after(spot_bill.started_at + 2), bool)
    await _set_spot(sim, "g6.xlarge", "us-east-1b", 0.9)
    await _set_spot(sim, "g5.xlarge", "us-west-2a", 1.5)
    await _pass(1.5)
    await _set_spot(sim, "g6.xlarge", "us-east-1b", 0.05)
    await _pass(1.5)
    final = await aws.terminate(spot.instance_id)  # under 60 s, across two changes

    # the long one runs past the minimum (started a minute earlier, as far as EC2 and its ledger
    # know: the test does not wait out the minute), then EC2 reclaims it
    await admin(sim, "POST", f"/_sim/instances/{long.instance_id}/backdate", {"seconds": 60})
    await wait_for(lambda: _after(long_bill.started_at + 4), bool, timeout=30, interval=0.2)
    await admin(sim, "POST", f"/_sim/instances/{long.instance_id}/interrupt", {"notice_seconds": 0})
    ended = await wait_for(
        lambda: _by_id(aws),
        lambda seen: all((b := seen[i.instance_id].bill) is not None and b.ended_at is not None for i in (short, spot, long)),
        timeout=30,
    )
    ledger = {row["id"]: row for row in (await admin(sim, "GET", "/_sim/ledger"))["entries"]}
    bills: dict[str, Bill] = {}
    for instance in (short, spot, long):
        bill, row = ended[instance.instance_id].bill, ledger[instance.instance_id]
        assert bill is not None
        bills[instance.instance_id] = bill
        assert (bill.started_at, bill.ended_at) == (row["started"], row["stopped"]), instance.name
        assert bill.cost_usd == pytest.approx(row["cost_usd"], rel=0.01), instance.name
    assert final == bills[spot.instance_id]  # terminate() gave the final bill at once
    assert ledger[short.instance_id]["billed_seconds"] == 60
    assert bills[short.instance_id].cost_usd == pytest.approx(60 * 1.006 / 3600)
    assert ledger[long.instance_id]["billed_seconds"] >= 64
    # the changes counted: neither the launch price nor the last one alone gives these bills
    spot_cost = bills[spot.instance_id].cost_usd
    assert spot_cost != pytest.approx(60 * 0.3312 / 3600, rel=0.05) and spot_cost != pytest.approx(60 * 0.05 / 3600, rel=0.05)
    long_seconds = ledger[long.instance_id]["billed_seconds"]
    assert bills[long.instance_id].cost_usd != pytest.approx(long_seconds * 0.3951 / 3600, rel=0.05)
    # a final bill does not move any more
    assert (await _by_id(aws))[spot.instance_id].bill == bills[spot.instance_id]


async def test_an_instance_terminated_while_pending_costs_nothing(tmp_path: Path) -> None:
    """EC2 bills from `running` on: an early replacement cancelled before it booted is free, in
    terminate()'s final bill, in later listings and in the ledger. (The fault storm found the
    adapter charging such an instance EC2's 60 s minimum.)"""
    async with running_simulator(tmp_path / "sim", boot_delay=30.0) as sim:
        aws = make_adapter(sim, tmp_path)
        await aws.start()
        try:
            offers = await aws.offers()
            launched = await aws.launch(
                request(offer_for(offers, "g6.xlarge", "us-east-1b", CapacityType.SPOT), "early", 1, SLEEPER)
            )
            seen = await _by_id(aws)
            assert seen[launched.instance_id].extra.get("ec2_state") == "pending"
            final = await aws.terminate(launched.instance_id)
            assert final is not None and final.ended_at is not None
            assert final.cost_usd == 0.0
            listed = (await _by_id(aws))[launched.instance_id].bill
            assert listed is not None and listed.cost_usd == 0.0
            ledger = {row["id"]: row for row in (await admin(sim, "GET", "/_sim/ledger"))["entries"]}
            row = ledger[launched.instance_id]
            assert (row["started"], row["billed_seconds"], row["cost_usd"]) == (None, 0, 0.0)
        finally:
            await clean_up(aws, sim)


async def test_a_listing_does_not_wait_for_a_slow_spot_price_read(aws: AwsAdapter, sim: AwsSimulator) -> None:
    """The fault storm's latency scenario: with DescribeSpotPriceHistory taking 10 s, every AWS
    listing that billed an ended spot instance took 10 s too, longer than a tick, and a listing
    slower than the tick is never used: every AWS job of the scenario stayed `launching` for
    good. A listing now bills from the prices read before (not final) while a fresh read runs
    in the background, and the final bill follows once that read is in."""
    offers = await aws.offers()
    spot = await aws.launch(request(offer_for(offers, "g6.xlarge", "us-east-1b", CapacityType.SPOT), "slow", 1, LONGER))
    await wait_for(lambda: _by_id(aws), lambda seen: seen[spot.instance_id].bill is not None)  # prices read
    await _pass(1.5)  # EC2's end times are whole seconds: an end in the second of that read would count as after it
    await admin(sim, "POST", "/_sim/faults", {"code": "latency", "rate": 1.0, "delay": 8,
                                              "actions": ["DescribeSpotPriceHistory"]})
    await admin(sim, "POST", f"/_sim/instances/{spot.instance_id}/interrupt", {"notice_seconds": 0})
    took: list[float] = []

    async def listing() -> dict[str, Instance]:
        t0 = time.monotonic()
        seen = await _by_id(aws)
        took.append(time.monotonic() - t0)
        return seen

    seen = await wait_for(listing, lambda s: (b := s[spot.instance_id].bill) is not None and b.ended_at is not None,
                          timeout=20, interval=0.2)
    assert max(took) < 6, took  # none waited for the 8 s price read
    assert spot.instance_id not in aws._bills  # an ended instance's bill is not final on old prices
    assert sim.ec2.calls["DescribeSpotPriceHistory"] >= 1
    await admin(sim, "DELETE", "/_sim/faults")  # the read in flight ends in its own time
    ledger = {row["id"]: row for row in (await admin(sim, "GET", "/_sim/ledger"))["entries"]}
    final = await wait_for(lambda: _by_id(aws), lambda s: spot.instance_id in aws._bills, timeout=30, interval=0.2)
    bill = final[spot.instance_id].bill
    assert bill is not None and bill.cost_usd == pytest.approx(ledger[spot.instance_id]["cost_usd"], rel=0.01)
    assert seen[spot.instance_id].bill is not None
