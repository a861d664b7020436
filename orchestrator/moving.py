"""Wait or move: when a job whose volume syncs to object storage finds no capacity where its
volume lives, is it cheaper to wait there or to start elsewhere and restore from the store?

Moving costs money now: the checkpoint's egress ($/GB x its size), the minutes a new machine
bills while it restores the checkpoint at the configured bandwidth, and, when the new place is
dearer than the pinned one, the difference over the hours the job is expected to run there.
Waiting costs the job's time: the expected remaining wait at the pinned place, priced at what
an hour of the job's progress is worth (by default the pinned machine's own price per hour: a
user who pays $2/h for progress values an idle hour at no less). The expected wait is learned
from the daemon's own record of capacity gaps at that place (gamma-exponential: a configured
prior counts as `prior_weight_gaps` gaps of `prior_wait_seconds`; every observed gap, ended or
still open, adds its seconds; every ended gap adds one to the count). Gaps are memoryless in
this model, so a long current gap raises the estimate through the seconds it adds.

Everything here is a pure function of its arguments (no I/O, no clock): the engine gathers the
offers, the volume and the history, and records what this returns with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.models import Offer
from orchestrator.placement import Candidate

GapKey = tuple[str, str, str]  # (provider, region, GPU model or "" for CPU-only)


@dataclass(frozen=True)
class MovingSettings:
    """See config.MovingSettingsModel, whose fields these mirror, for what each one means."""

    enabled: bool = True
    egress_usd_per_gb: float = 0.09
    restore_mb_per_second: float = 100.0
    wait_cost_multiple: float = 1.0
    wait_usd_per_hour: float | None = None
    premium_hours: float = 1.0
    prior_wait_seconds: float = 1800.0
    prior_weight_gaps: float = 2.0
    history_days: float = 14.0


@dataclass(frozen=True)
class GapStats:
    """Capacity gaps seen at one place: `ended` of them came back; `seconds` adds up every gap's
    length (an open one's so far)."""

    ended: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class MoveCost:
    egress_usd: float
    restore_seconds: float
    restore_usd: float
    premium_usd: float

    @property
    def transfer_usd(self) -> float:
        """What the move itself costs: egress plus the restore's machine time."""
        return self.egress_usd + self.restore_usd

    @property
    def total_usd(self) -> float:
        return self.transfer_usd + self.premium_usd


@dataclass(frozen=True)
class MoveOption:
    candidate: Candidate
    cost: MoveCost
    reason: str


@dataclass(frozen=True)
class MoveChoice:
    """`options` are the places cheaper to move to than waiting, best first (empty: wait)."""

    wait_seconds: float
    wait_usd: float
    options: tuple[MoveOption, ...]
    reason: str  # why waiting was chosen, or why the best option beat waiting

    @property
    def move(self) -> bool:
        return bool(self.options)


def expected_wait_seconds(stats: GapStats | None, settings: MovingSettings) -> float:
    """Posterior mean gap length: (prior gaps x prior seconds + seen seconds) / (prior gaps + ended gaps)."""
    ended = max(stats.ended, 0) if stats else 0
    seconds = max(stats.seconds, 0.0) if stats else 0.0
    weight = max(settings.prior_weight_gaps, 0.0)
    if weight + ended <= 0:
        return max(settings.prior_wait_seconds, 0.0)
    return (weight * settings.prior_wait_seconds + seconds) / (weight + ended)


def wait_usd_per_hour(pinned_price: float, settings: MovingSettings) -> float:
    """What an hour of the job waiting idle costs."""
    if settings.wait_usd_per_hour is not None:
        return settings.wait_usd_per_hour
    return settings.wait_cost_multiple * max(pinned_price, 0.0)


def move_cost(checkpoint_gb: float, new_price: float, pinned_price: float, settings: MovingSettings) -> MoveCost:
    """The cost of starting at a place priced `new_price` ($/h, preemption-adjusted) instead of
    the pinned one, priced `pinned_price`."""
    gb = max(checkpoint_gb, 0.0)
    restore_s = gb * 1024 / settings.restore_mb_per_second if settings.restore_mb_per_second > 0 else 0.0
    return MoveCost(
        egress_usd=gb * settings.egress_usd_per_gb,
        restore_seconds=restore_s,
        restore_usd=restore_s / 3600 * max(new_price, 0.0),
        premium_usd=(new_price - pinned_price) * settings.premium_hours,
    )


def decide(candidates: Sequence[Candidate], pinned: str, pinned_price: float, checkpoint_gb: float,
           gaps: GapStats | None, settings: MovingSettings) -> MoveChoice:
    """Wait at `pinned` (a place's name, for the reason) or move to one of `candidates` (ranked
    by placement, none of them at the pinned place). Only the options cheaper than waiting are
    kept, cheapest move first; ties keep placement's order."""
    wait_s = expected_wait_seconds(gaps, settings)
    per_hour = wait_usd_per_hour(pinned_price, settings)
    wait_usd = wait_s / 3600 * per_hour
    seen = f"{gaps.ended} gap(s) seen there" if gaps and (gaps.ended or gaps.seconds) else "no gaps seen there yet"
    waiting = (f"expected wait at {pinned} {wait_s / 60:.1f} min ({seen}) x ${per_hour:.2f}/h = ${wait_usd:.2f}")
    if not settings.enabled:
        return MoveChoice(wait_s, wait_usd, (), f"moving is off ([moving] enabled = false); {waiting}")
    options: list[tuple[float, int, MoveOption]] = []
    best_rejected: tuple[float, str] | None = None
    for n, cand in enumerate(candidates):
        cost = move_cost(checkpoint_gb, cand.expected_cost_per_hour, pinned_price, settings)
        where = f"{cand.offer.provider}/{cand.offer.region}"
        moving = (f"move to {where} ${cost.total_usd:.2f} (egress {checkpoint_gb:g} GB x "
                  f"${settings.egress_usd_per_gb:.3f} = ${cost.egress_usd:.2f}, restore {cost.restore_seconds:.0f} s "
                  f"at ${cand.expected_cost_per_hour:.2f}/h = ${cost.restore_usd:.2f}, price difference "
                  f"{settings.premium_hours:g} h x ${cand.expected_cost_per_hour - pinned_price:+.2f}/h = "
                  f"${cost.premium_usd:+.2f})")
        if cost.total_usd < wait_usd:
            options.append((round(cost.total_usd, 9), n, MoveOption(
                cand, cost, f"moved from {pinned}, which has no capacity: {moving} < {waiting}; {cand.reason}")))
        elif best_rejected is None or cost.total_usd < best_rejected[0]:
            best_rejected = (cost.total_usd, moving)
    options.sort(key=lambda t: (t[0], t[1]))
    if options:
        return MoveChoice(wait_s, wait_usd, tuple(o for _, _, o in options), options[0][2].reason)
    if best_rejected is None:
        return MoveChoice(wait_s, wait_usd, (), f"waiting at {pinned}: no capacity elsewhere either; {waiting}")
    return MoveChoice(wait_s, wait_usd, (), f"waiting at {pinned}: {waiting} <= {best_rejected[1]}")


def gap_key(offer: Offer) -> GapKey:
    return (offer.provider, offer.region, offer.gpu or "")


def capacity_by_place(offers: Iterable[Offer]) -> dict[GapKey, bool]:
    """Whether each (provider, region, GPU) offers any capacity now."""
    out: dict[GapKey, bool] = {}
    for offer in offers:
        key = gap_key(offer)
        out[key] = out.get(key, False) or offer.available > 0
    return out


def gap_transitions(known: Mapping[GapKey, bool], now: Mapping[GapKey, bool]
                    ) -> tuple[list[GapKey], list[GapKey]]:
    """(places whose capacity just ran out, places whose capacity just came back), comparing
    what was known of one provider with its fresh offer list. A place seen for the first time
    without capacity opens a gap too (when it began is unknown: the gap counts from now), and so
    does a place that had capacity and is no longer offered at all."""
    opened = [k for k, has in now.items() if not has and known.get(k, True)]
    opened += [k for k, has in known.items() if has and k not in now]
    closed = [k for k, has in now.items() if has and known.get(k) is False]
    return sorted(opened), sorted(closed)
