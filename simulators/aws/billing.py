"""How the simulated EC2 bills an instance, the rule `/_sim/ledger` applies (EC2's own):

* billing starts when the instance enters `running` (the simulator reports that moment as the
  instance's `LaunchTime`) and stops when it leaves `running` (the moment written into
  `StateTransitionReason`, "User initiated (YYYY-MM-DD HH:MM:SS GMT)"); both are whole seconds,
  as EC2 reports them;
* per second, with a minimum of 60 seconds (an instance that ran 12 s is charged 60 s);
* a spot instance pays the spot price in force over each part of that interval: the price of
  its zone's history entry current at each moment (changes take effect at the whole second
  DescribeSpotPriceHistory reports); an on-demand instance pays its type's on-demand price.

Written apart from the adapter's own implementation on purpose: the tests compare the two.
"""

from __future__ import annotations

MINIMUM_SECONDS = 60


def billed_seconds(started: float, stopped: float) -> int:
    return max(MINIMUM_SECONDS, int(stopped - started))


def cost(started: float, stopped: float, history: list[tuple[float, float]]) -> float:
    """USD for an instance billed from `started` to `stopped` (whole seconds) at the prices of
    `history`, (time, USD/hour) oldest first; the oldest entry also covers earlier times."""
    end = started + billed_seconds(started, stopped)
    changes = [(float(int(ts)), price) for ts, price in history]
    total = 0.0
    second = started
    for i, (_, price) in enumerate(changes):
        next_change = changes[i + 1][0] if i + 1 < len(changes) else end
        segment_end = min(end, max(next_change, second))
        if segment_end > second:
            total += (segment_end - second) * price / 3600.0
            second = segment_end
        if second >= end:
            break
    return total
