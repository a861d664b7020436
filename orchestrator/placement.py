"""Choose where a job runs: filter every offer against the spec, then rank the survivors by
expected cost to finish rather than by sticker price.

A spot machine that is preempted often is not cheap: every preemption costs a restart (get a
replacement, pull the image) plus, on average, half a checkpoint interval of lost work, all paid
at the same hourly price. So each offer's price is inflated by
``rate x (restart overhead + checkpoint interval / 2)``, where the preemption rate blends a
configured prior with the daemon's own history (gamma-Poisson). Every rejection and every
candidate carries a human reason, so a decision can always be explained afterwards.

Everything here is a pure function of its arguments: no I/O, no clock, no globals read at call
time. The engine gathers offers, volume location and history, and records what this returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.gpus import canonical_gpu
from orchestrator.models import CapacityPreference, CapacityType, JobSpec, Offer, cuda_tuple

DEFAULT_SPOT_RATE = 0.05  # preemptions per hour for a spot market nobody configured
DEFAULT_DISPLAY_CHECKPOINT_INTERVAL = 600.0  # seconds, for `gpuhop offers`


@dataclass(frozen=True)
class VolumeLocation:
    """Where the job's volume lives; both None = it does not exist yet (first placement decides)."""

    provider: str | None
    region: str | None

    @property
    def exists(self) -> bool:
        return self.provider is not None


@dataclass(frozen=True)
class RateStats:
    """The daemon's own history for one (provider, capacity type)."""

    preemptions: int
    hours: float


@dataclass(frozen=True)
class PlacementSettings:
    prior_rates: Mapping[tuple[str, CapacityType], float] = field(default_factory=dict)
    prior_weight_hours: float = 24.0
    restart_overhead_seconds: Mapping[str, float] = field(default_factory=dict)
    default_restart_overhead_seconds: float = 120.0
    default_spot_rate: float = DEFAULT_SPOT_RATE
    default_on_demand_rate: float = 0.0

    def prior_rate(self, provider: str, capacity: CapacityType) -> float:
        if (provider, capacity) in self.prior_rates:
            return self.prior_rates[(provider, capacity)]
        if capacity is CapacityType.SPOT:
            return self.default_spot_rate
        return self.default_on_demand_rate

    def restart_overhead(self, provider: str) -> float:
        return self.restart_overhead_seconds.get(provider, self.default_restart_overhead_seconds)


@dataclass(frozen=True)
class Candidate:
    offer: Offer
    expected_cost_per_hour: float
    rate_per_hour: float
    reason: str


@dataclass(frozen=True)
class Rejection:
    offer: Offer
    reason: str  # a full sentence about this offer
    kind: str = ""  # a short label shared by similar rejections, for summaries


@dataclass(frozen=True)
class PlacementResult:
    candidates: tuple[Candidate, ...]  # best first
    rejected: tuple[Rejection, ...]

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def summary(self) -> str:
        """E.g. "12 offers: 3 suitable; rejected 5 wrong GPU, 2 over max price"."""
        total = len(self.candidates) + len(self.rejected)
        text = f"{total} offer{'' if total == 1 else 's'}: {len(self.candidates)} suitable"
        if not self.rejected:
            return text
        counts = Counter(r.kind or r.reason for r in self.rejected)  # keeps first-seen order
        groups = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: ties stay first-seen
        return text + "; rejected " + ", ".join(f"{n} {kind}" for kind, n in groups)


def preemption_rate(prior_per_hour: float, prior_weight_hours: float, stats: RateStats | None) -> float:
    """Gamma-Poisson posterior mean: the prior counts as `prior_weight_hours` of observation."""
    weight = max(prior_weight_hours, 0.0)
    preemptions = max(stats.preemptions, 0) if stats else 0
    hours = max(stats.hours, 0.0) if stats else 0.0
    if weight + hours <= 0:
        return max(prior_per_hour, 0.0)
    return max((prior_per_hour * weight + preemptions) / (weight + hours), 0.0)


def _describe(offer: Offer) -> str:
    machine = f"{offer.gpu} x{offer.gpu_count}" if offer.gpu else "CPU"
    return f"{offer.provider} {offer.region} {machine} {offer.capacity.value} ${offer.price_per_hour:.2f}/h"


def _expected(
    offer: Offer,
    settings: PlacementSettings,
    stats: Mapping[tuple[str, CapacityType], RateStats],
    checkpoint_interval: float,
) -> tuple[float, float, str]:
    key = (offer.provider, offer.capacity)
    rate = preemption_rate(settings.prior_rate(*key), settings.prior_weight_hours, stats.get(key))
    restart_h = settings.restart_overhead(offer.provider) / 3600
    half_h = checkpoint_interval / 2 / 3600
    cost = offer.price_per_hour * (1 + rate * (restart_h + half_h))
    reason = (
        f"{_describe(offer)}; expected ${cost:.2f}/h ({rate:.3f} preemptions/h x "
        f"({restart_h:.2f} h restart + {half_h:.2f} h half checkpoint interval))"
    )
    return cost, rate, reason


def _sort_key(offer: Offer, cost: float, cpu_only: bool) -> tuple[float | int | str, ...]:
    on_demand_first = 0 if offer.capacity is CapacityType.ON_DEMAND else 1
    tail = (on_demand_first, offer.provider, offer.region, offer.offer_id)
    if cpu_only:  # a CPU-only job should not tie up GPUs: fewest GPUs first, then cost
        return (offer.gpu_count, round(cost, 9), *tail)
    return (round(cost, 9), offer.gpu_count, *tail)


def _region_allowed(region: str, allowed: Sequence[str]) -> bool:
    low = region.lower()
    return any(low.startswith(a.lower()) for a in allowed)


def _offer_vram(offer: Offer) -> int:
    if offer.vram_gb > 0 or offer.gpu is None:
        return offer.vram_gb
    gpu = canonical_gpu(offer.gpu)
    return gpu.vram_gb if gpu else 0


def _reject_reason(
    spec: JobSpec, offer: Offer, volume: VolumeLocation | None, exclude: frozenset[str]
) -> tuple[str, str] | None:
    """(kind, sentence) for the first filter the offer fails, or None when it is suitable."""
    res, pl = spec.resources, spec.placement
    if pl.providers is not None and offer.provider not in pl.providers:
        return "provider not allowed", f"provider {offer.provider} is not in {pl.providers}"
    if pl.regions is not None and not _region_allowed(offer.region, pl.regions):
        return "region not allowed", f"region {offer.region} does not match {pl.regions}"
    wanted = {
        CapacityPreference.SPOT: {CapacityType.SPOT},
        CapacityPreference.ON_DEMAND: {CapacityType.ON_DEMAND},
        CapacityPreference.AUTO: {CapacityType.SPOT, CapacityType.ON_DEMAND},
    }[pl.capacity]
    if offer.capacity not in wanted:
        return "wrong capacity type", f"{offer.capacity.value} capacity, the job asks for {pl.capacity.value}"
    if res.gpu_count > 0:
        if offer.gpu is None or offer.gpu_count <= 0:
            return "wrong GPU", "a CPU-only offer, the job needs a GPU"
        if res.gpu is not None and offer.gpu not in res.gpu:
            return "wrong GPU", f"GPU {offer.gpu} is not one of {res.gpu}"
        if offer.gpu_count < res.gpu_count:
            return "too few GPUs", f"{offer.gpu_count} GPU(s), the job needs {res.gpu_count}"
        if res.min_vram_gb is not None and _offer_vram(offer) < res.min_vram_gb:
            return "too little VRAM", f"{_offer_vram(offer)} GB VRAM per GPU, the job needs {res.min_vram_gb}"
        if res.min_cuda is not None and offer.max_cuda is not None and (
                cuda_tuple(offer.max_cuda) < cuda_tuple(res.min_cuda)):
            return "host CUDA too old", f"the host's driver supports CUDA {offer.max_cuda}, the job needs {res.min_cuda}"
    if offer.vcpu and offer.vcpu < res.min_vcpu:
        return "too few vCPUs", f"{offer.vcpu} vCPUs, the job needs {res.min_vcpu}"
    if offer.memory_gb and offer.memory_gb < res.min_memory_gb:
        return "too little memory", f"{offer.memory_gb} GB memory, the job needs {res.min_memory_gb}"
    if offer.disk_gb and offer.disk_gb < res.disk_gb:
        return "too little disk", f"{offer.disk_gb} GB disk, the job needs {res.disk_gb}"
    if pl.max_price_per_hour is not None and offer.price_per_hour > pl.max_price_per_hour:
        return "over max price", (
            f"${offer.price_per_hour:.2f}/h is over the maximum ${pl.max_price_per_hour:.2f}/h"
        )
    if volume is not None:
        if not offer.supports_volumes:
            return "no volume support", "the offer cannot attach a volume and the job has one"
        if volume.exists and (
            offer.provider != volume.provider
            or (volume.region is not None and offer.region != volume.region)
        ):
            where = f"{volume.provider}/{volume.region}"
            return f"away from the volume in {where}", f"the job's volume lives in {where}"
    if offer.available <= 0:
        return "unavailable", "the provider reports no capacity left"
    if f"{offer.provider}:{offer.offer_id}" in exclude:
        return "just failed: no capacity", "just failed: no capacity"
    return None


def place(
    spec: JobSpec,
    offers: Sequence[Offer],
    volume: VolumeLocation | None,
    stats: Mapping[tuple[str, CapacityType], RateStats],
    settings: PlacementSettings,
    exclude: frozenset[str] = frozenset(),
) -> PlacementResult:
    """Every offer either becomes a ranked Candidate (best first) or a Rejection with its reason.

    `volume` is None when the job has no volume. `exclude` holds "provider:offer_id" keys of
    offers that just failed for lack of capacity.
    """
    cpu_only = spec.resources.gpu_count == 0
    ranked: list[tuple[tuple[float | int | str, ...], Candidate]] = []
    rejected: list[Rejection] = []
    for offer in offers:
        why = _reject_reason(spec, offer, volume, exclude)
        if why is not None:
            kind, sentence = why
            rejected.append(Rejection(offer, f"{_describe(offer)}: {sentence}", kind))
            continue
        cost, rate, reason = _expected(offer, settings, stats, spec.policy.checkpoint_interval)
        ranked.append((_sort_key(offer, cost, cpu_only), Candidate(offer, cost, rate, reason)))
    ranked.sort(key=lambda pair: pair[0])
    return PlacementResult(tuple(c for _, c in ranked), tuple(rejected))


def rank_offers_for_display(
    offers: Sequence[Offer],
    settings: PlacementSettings,
    stats: Mapping[tuple[str, CapacityType], RateStats],
    checkpoint_interval: float = DEFAULT_DISPLAY_CHECKPOINT_INTERVAL,
) -> list[tuple[Offer, float]]:
    """Every offer with its expected cost per hour, cheapest first (for `gpuhop offers`)."""
    scored = [(o, _expected(o, settings, stats, checkpoint_interval)[0]) for o in offers]
    scored.sort(key=lambda pair: _sort_key(pair[0], pair[1], cpu_only=False))
    return scored
