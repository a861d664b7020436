"""The wait-or-move decision (orchestrator/moving.py) as tables: pure functions, no I/O."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.models import CapacityType, Offer
from orchestrator.moving import (
    GapStats,
    MovingSettings,
    capacity_by_place,
    decide,
    expected_wait_seconds,
    gap_transitions,
    move_cost,
)
from orchestrator.placement import Candidate

S = MovingSettings()


def cand(region: str, price: float, provider: str = "aws") -> Candidate:
    offer = Offer(provider=provider, offer_id=f"{region}-x", region=region, gpu="A100-80GB-SXM", gpu_count=1,
                  vram_gb=80, vcpu=8, memory_gb=64, disk_gb=100, capacity=CapacityType.ON_DEMAND,
                  price_per_hour=price, available=1)
    return Candidate(offer, price, 0.0, f"{provider} {region} ${price:.2f}/h")


@pytest.mark.parametrize(("stats", "expected"), [
    (None, 1800.0),                                  # the prior alone
    (GapStats(0, 0.0), 1800.0),
    (GapStats(8, 8 * 60.0), (2 * 1800 + 480) / 10),  # eight one-minute gaps pull it down to ~7 min
    (GapStats(0, 7200.0), (2 * 1800 + 7200) / 2),    # an open gap two hours long pushes it up
])
def test_expected_wait_blends_the_prior_with_the_gaps_seen(stats: GapStats | None, expected: float) -> None:
    assert expected_wait_seconds(stats, S) == pytest.approx(expected)


def test_move_cost_adds_egress_restore_time_and_price_difference() -> None:
    cost = move_cost(100, new_price=2.0, pinned_price=1.5, settings=S)
    assert cost.egress_usd == pytest.approx(9.0)                  # 100 GB x $0.09
    assert cost.restore_seconds == pytest.approx(1024.0)          # 102,400 MB at 100 MB/s
    assert cost.restore_usd == pytest.approx(1024 / 3600 * 2.0)
    assert cost.premium_usd == pytest.approx(0.5)                 # 1 h x $0.50/h dearer
    assert cost.transfer_usd == pytest.approx(9.0 + 1024 / 3600 * 2.0)
    assert move_cost(100, 1.0, 1.5, S).premium_usd == pytest.approx(-0.5)  # a cheaper place saves


def test_a_long_expected_wait_moves_to_the_cheapest_move() -> None:
    choice = decide([cand("us-east-1b", 3.0), cand("us-west-2a", 2.0)], "aws/us-east-1a", 2.0, 20,
                    GapStats(0, 3 * 3600.0), S)  # three hours without capacity so far
    assert choice.move
    assert [o.candidate.offer.region for o in choice.options] == ["us-west-2a", "us-east-1b"]
    best = choice.options[0]
    assert best.cost.transfer_usd == pytest.approx(20 * 0.09 + 20 * 1024 / 100 / 3600 * 2.0)
    assert best.reason.startswith("moved from aws/us-east-1a, which has no capacity: move to aws/us-west-2a")
    assert "expected wait at aws/us-east-1a" in best.reason and best.reason.endswith("aws us-west-2a $2.00/h")


def test_a_short_expected_wait_keeps_the_job_waiting() -> None:
    short = GapStats(30, 30 * 20.0)  # thirty gaps of 20 s: capacity comes back fast there
    choice = decide([cand("us-west-2a", 2.0)], "aws/us-east-1a", 2.0, 20, short, S)
    assert not choice.move and choice.options == ()
    assert choice.reason.startswith("waiting at aws/us-east-1a: expected wait at aws/us-east-1a")
    assert "<= move to aws/us-west-2a" in choice.reason


def test_a_fixed_cost_of_waiting_replaces_the_multiple() -> None:
    free_wait = MovingSettings(wait_usd_per_hour=0.0)
    assert not decide([cand("b", 1.0)], "aws/a", 1.0, 1, None, free_wait).move
    dear_wait = MovingSettings(wait_usd_per_hour=100.0, premium_hours=0.0)
    assert decide([cand("b", 5.0)], "aws/a", 1.0, 1, GapStats(50, 50 * 60.0), dear_wait).move


def test_moving_off_or_nowhere_to_go_waits() -> None:
    assert not decide([cand("b", 1.0)], "aws/a", 1.0, 1, None, MovingSettings(enabled=False)).move
    nowhere = decide([], "aws/a", 1.0, 1, None, S)
    assert not nowhere.move and "no capacity elsewhere either" in nowhere.reason


def test_capacity_gaps_open_and_close_on_transitions_only() -> None:
    k1, k2, k3 = ("aws", "a", "A100"), ("aws", "b", "A100"), ("aws", "c", "A100")
    offers = [dataclasses.replace(cand("a", 1.0).offer, gpu="A100", available=0),
              dataclasses.replace(cand("b", 1.0).offer, gpu="A100", available=2)]
    now = capacity_by_place(offers)
    assert now == {k1: False, k2: True}
    assert gap_transitions({}, now) == ([k1], [])              # first seen without capacity: a gap opens
    assert gap_transitions({k1: False, k2: True}, now) == ([], [])  # nothing changed: nothing written
    assert gap_transitions({k1: False, k2: False}, now) == ([], [k2])
    assert gap_transitions({k1: False, k2: True, k3: True}, now) == ([k3], [])  # no longer offered at all


def test_the_config_section_and_the_decision_settings_agree() -> None:
    from orchestrator.config import MovingSettingsModel, Settings
    from orchestrator.relocation import moving_settings

    assert moving_settings(Settings().moving) == MovingSettings()  # the same defaults, field by field
    assert set(MovingSettingsModel.model_fields) == set(MovingSettings.__dataclass_fields__)
    assert moving_settings(MovingSettingsModel(wait_usd_per_hour=3.0)).wait_usd_per_hour == 3.0
