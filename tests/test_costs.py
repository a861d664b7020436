"""Cost reports as tables (orchestrator/costs.py): what each group spent, the GPU hours, and
the saving against the cheapest on-demand offer of the same GPU. No I/O."""

from __future__ import annotations

import pytest

from orchestrator.costs import Spend, cheapest_on_demand, summarize
from orchestrator.models import AttemptStatus, CapacityType, Offer
from orchestrator.reconcile import AttemptView

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC
H = 3600.0


def spend(job: str, provider: str, capacity: str, price: float, hours: float, *, gpu: str | None = "H100-SXM",
          live: bool = False, started: float = NOW - 10 * H, cost: float | None = None) -> Spend:
    a = AttemptView(
        id=hash((job, provider, started)) % 10_000, number=1, name=f"gpuhop-{job}-1", provider=provider,
        status=AttemptStatus.RUNNING if live else AttemptStatus.ENDED, price_per_hour=price,
        launched_at=started, ended_at=None if live else started + hours * H,
        cost_usd=0.0 if live else (cost if cost is not None else price * hours), created_at=started,
    )
    return Spend(job, f"name-{job}", a, capacity, gpu, 1)


def od_offer(gpu: str, price: float) -> Offer:
    return Offer(provider="aws", offer_id=f"od-{gpu}", region="us-east-1a", gpu=gpu, gpu_count=1, vram_gb=80,
                 vcpu=8, memory_gb=64, disk_gb=0, capacity=CapacityType.ON_DEMAND, price_per_hour=price)


ON_DEMAND = cheapest_on_demand([od_offer("H100-SXM", 4.0), od_offer("H100-SXM", 3.0),
                                Offer(provider="aws", offer_id="s", region="us-east-1a", gpu="H100-SXM",
                                      gpu_count=1, vram_gb=80, vcpu=8, memory_gb=64, disk_gb=0,
                                      capacity=CapacityType.SPOT, price_per_hour=0.5)])


def test_the_cheapest_on_demand_price_is_the_yardstick() -> None:
    assert ON_DEMAND == {("H100-SXM", 1): 3.0}  # spot offers are not a yardstick


def test_by_provider_with_savings() -> None:
    spends = [spend("a", "aws", "spot", 1.2, 2.0), spend("b", "aws", "spot", 1.0, 1.0),
              spend("c", "runpod", "on-demand", 2.5, 2.0)]
    r = summarize(spends, "provider", NOW - 24 * H, NOW, ON_DEMAND)
    runpod, aws = r.lines  # biggest spend first: runpod 5.0, aws 3.4
    assert (runpod.key, runpod.cost_usd, runpod.attempts) == ("runpod on-demand", pytest.approx(5.0), 1)
    assert runpod.saved_usd == pytest.approx(0.0)  # on-demand saves nothing by definition
    assert (aws.key, aws.cost_usd, aws.hours) == ("aws spot", pytest.approx(3.4), pytest.approx(3.0))
    assert aws.on_demand_usd == pytest.approx(9.0) and aws.saved_usd == pytest.approx(5.6)
    assert r.total.cost_usd == pytest.approx(8.4) and r.total.saved_usd == pytest.approx(5.6)


def test_a_gpu_without_an_on_demand_offer_makes_the_saving_unknown_not_zero() -> None:
    r = summarize([spend("a", "aws", "spot", 1.0, 1.0, gpu="L4")], "provider", 0.0, NOW, ON_DEMAND)
    assert r.lines[0].saved_usd is None and r.total.saved_usd is None
    assert r.total.cost_usd == pytest.approx(1.0)


def test_live_attempts_count_so_far_and_old_ones_are_outside_the_window() -> None:
    spends = [spend("live", "aws", "spot", 2.0, 0, live=True, started=NOW - 1.5 * H),
              spend("old", "aws", "spot", 9.0, 1.0, started=NOW - 48 * H)]
    r = summarize(spends, "job", NOW - 24 * H, NOW, ON_DEMAND)
    (line,) = r.lines
    assert line.key == "live name-live" and line.cost_usd == pytest.approx(3.0) and line.hours == pytest.approx(1.5)


def test_by_day_in_date_order_and_an_attempt_never_launched_costs_nothing() -> None:
    day1 = spend("a", "aws", "spot", 1.0, 1.0, started=NOW - 30 * H)
    day2 = spend("b", "aws", "spot", 1.0, 2.0, started=NOW - 2 * H)
    never = Spend("c", "c", AttemptView(id=9, number=1, name="gpuhop-c-1", provider="aws",
                                        status=AttemptStatus.ENDED, price_per_hour=1.0, created_at=NOW - H),
                  "spot", "H100-SXM", 1)
    r = summarize([day2, day1, never], "day", 0.0, NOW, ON_DEMAND)
    assert [x.key for x in r.lines] == ["2027-01-14", "2027-01-15"]
    assert r.total.attempts == 2
    with pytest.raises(ValueError):
        summarize([], "week", 0.0, NOW, ON_DEMAND)
