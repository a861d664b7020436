"""What EC2 charges for an instance, from EC2's own times: pure functions, no I/O.

EC2 bills Linux instances per second from `LaunchTime` until the instance leaves `running`
(the moment of the transition to stopping or shutting-down, which EC2 writes into
`StateTransitionReason` as "User initiated (YYYY-MM-DD HH:MM:SS GMT)"), with a minimum of 60
seconds. Spot instances pay the spot price in force over each part of that interval (from
`DescribeSpotPriceHistory`: the price at the start and every change after it); on-demand ones
the price from the shipped table.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

MINIMUM_SECONDS = 60
_TRANSITION = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\s*(?:GMT|UTC)\)")
ENDED_STATES = frozenset({"stopping", "stopped", "shutting-down", "terminated"})


def parse_transition_time(reason: str) -> float | None:
    """UNIX time in a StateTransitionReason such as "User initiated (2026-01-02 03:04:05 GMT)"."""
    match = _TRANSITION.search(reason or "")
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def timestamp(value: Any) -> float | None:
    """A boto3 datetime (or ISO text) as UNIX seconds."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return None


def price_steps(rows: list[dict[str, Any]], instance_type: str, zone: str) -> list[tuple[float, float]]:
    """(time, USD/hour) oldest first, for one type in one zone, from DescribeSpotPriceHistory rows."""
    steps = []
    for row in rows:
        if row.get("InstanceType") != instance_type or row.get("AvailabilityZone") != zone:
            continue
        when = timestamp(row.get("Timestamp"))
        if when is not None:
            steps.append((when, float(row["SpotPrice"])))
    steps.sort(key=lambda s: s[0])
    return steps


def billed_seconds(started: float, ended: float) -> int:
    """Whole seconds EC2 charges for [started, ended]: per second, at least 60."""
    return max(MINIMUM_SECONDS, math.floor(max(0.0, ended - started)))


def charge(started: float, ended: float, steps: list[tuple[float, float]]) -> float:
    """USD for [started, ended] at the price in force over it. `steps` is (time, USD/hour)
    oldest first; the first step also covers any time before it."""
    if not steps:
        return 0.0
    end = started + billed_seconds(started, ended)
    total = 0.0
    for i, (since, price) in enumerate(steps):
        until = steps[i + 1][0] if i + 1 < len(steps) else math.inf
        lo = started if i == 0 else max(started, since)
        hi = min(end, until)
        if hi > lo:
            total += (hi - lo) * price / 3600.0
    return total
