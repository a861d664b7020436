"""What gpuhop spent, at a glance (`gpuhop costs`, `GET /v1/costs`): every attempt's cost (the
provider's bill once the attempt ended, price x time so far while it runs, duplicates
included) grouped by provider, job or day, with what the same GPU hours would have cost on
the cheapest on-demand offer of that GPU known now: the saving users pick gpuhop for.

Pure: the API gathers the attempts and the offers, this adds them up. An attempt counts in
full on the day (UTC) it was launched; one started before `since` is left out, so a window's
figures never include money spent before it began.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from orchestrator.models import CapacityType, Offer
from orchestrator.reconcile import AttemptView, attempt_cost

GROUPS = ("provider", "job", "day")


@dataclass(frozen=True)
class Spend:
    """One attempt as the report needs it."""

    job_id: str
    job_name: str
    attempt: AttemptView
    capacity: str
    gpu: str | None
    gpu_count: int


@dataclass
class Line:
    key: str
    cost_usd: float = 0.0
    hours: float = 0.0  # machine hours billed (or running so far)
    attempts: int = 0
    on_demand_usd: float | None = 0.0  # the same hours at the cheapest on-demand price; None: unknown

    @property
    def saved_usd(self) -> float | None:
        return None if self.on_demand_usd is None else self.on_demand_usd - self.cost_usd


@dataclass
class Report:
    by: str
    since: float
    lines: list[Line] = field(default_factory=list)
    total: Line = field(default_factory=lambda: Line("total"))


def cheapest_on_demand(offers: Iterable[Offer]) -> dict[tuple[str, int], float]:
    """(GPU, count) -> the lowest on-demand price per hour among the offers known now."""
    out: dict[tuple[str, int], float] = {}
    for o in offers:
        if o.capacity is CapacityType.ON_DEMAND and o.gpu is not None:
            key = (o.gpu, o.gpu_count)
            out[key] = min(out.get(key, o.price_per_hour), o.price_per_hour)
    return out


def _hours(a: AttemptView, now: float) -> float:
    start = a.bill_started_at if a.bill_started_at is not None else a.launched_at
    if start is None:
        return 0.0
    end = a.ended_at if a.ended_at is not None else now
    return max(0.0, end - start) / 3600


def _key(s: Spend, by: str) -> str:
    if by == "provider":
        return f"{s.attempt.provider} {s.capacity}".strip()
    if by == "job":
        return f"{s.job_id} {s.job_name}"
    start = s.attempt.launched_at or s.attempt.created_at or 0.0
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d")


def summarize(spends: Sequence[Spend], by: str, since: float, now: float,
              on_demand: dict[tuple[str, int], float]) -> Report:
    """The report: one line per group, biggest spend first (days in date order), and the total."""
    if by not in GROUPS:
        raise ValueError(f"by must be one of {', '.join(GROUPS)}")
    report = Report(by, since)
    lines: dict[str, Line] = {}
    for s in spends:
        started = s.attempt.launched_at or s.attempt.created_at or 0.0
        if started < since:
            continue
        cost = attempt_cost(s.attempt, now)
        hours = _hours(s.attempt, now)
        if cost <= 0 and hours <= 0:
            continue  # never launched: nothing was spent
        od = on_demand.get((s.gpu, s.gpu_count)) if s.gpu is not None else None
        for line in (lines.setdefault(_key(s, by), Line(_key(s, by))), report.total):
            line.cost_usd += cost
            line.hours += hours
            line.attempts += 1
            if line.on_demand_usd is not None:
                # on-demand capacity saves nothing by definition; unknown GPUs make the saving unknown
                same = cost if s.capacity == CapacityType.ON_DEMAND.value else None
                line.on_demand_usd = (line.on_demand_usd + same if same is not None else
                                      line.on_demand_usd + od * hours if od is not None else None)
    ordered = sorted(lines.values(), key=(lambda ln: ln.key) if by == "day" else (lambda ln: -ln.cost_usd))
    report.lines = ordered
    return report
