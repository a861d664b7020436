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

A whole catalogue is filtered and ranked as columns (orchestrator/offer_index.py): each filter
is one vector operation, the best few candidates are found by a partial sort, and a sentence is
written only for what someone reads (the candidates returned, a rejection listed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from orchestrator.models import CapacityPreference, CapacityType, JobSpec, Offer
from orchestrator.offer_index import OfferIndex, cuda_code, offer_vram

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


def _where(volume: VolumeLocation | None) -> str:
    return f"{volume.provider}/{volume.region}" if volume is not None else ""


_Sentence = Callable[[Offer, JobSpec, "VolumeLocation | None"], str]

# The filters in the order they are tried: an offer is rejected by the first one it fails, with
# that filter's label (summaries count by it) and sentence (written only when it is read).
_FILTERS: tuple[tuple[str, _Sentence], ...] = (
    ("provider not allowed", lambda o, s, v: f"provider {o.provider} is not in {s.placement.providers}"),
    ("region not allowed", lambda o, s, v: f"region {o.region} does not match {s.placement.regions}"),
    ("wrong capacity type",
     lambda o, s, v: f"{o.capacity.value} capacity, the job asks for {s.placement.capacity.value}"),
    ("wrong GPU", lambda o, s, v: "a CPU-only offer, the job needs a GPU"),
    ("wrong GPU", lambda o, s, v: f"GPU {o.gpu} is not one of {s.resources.gpu}"),
    ("too few GPUs", lambda o, s, v: f"{o.gpu_count} GPU(s), the job needs {s.resources.gpu_count}"),
    ("too little VRAM",
     lambda o, s, v: f"{offer_vram(o)} GB VRAM per GPU, the job needs {s.resources.min_vram_gb}"),
    ("host CUDA too old",
     lambda o, s, v: f"the host's driver supports CUDA {o.max_cuda}, the job needs {s.resources.min_cuda}"),
    ("too few vCPUs", lambda o, s, v: f"{o.vcpu} vCPUs, the job needs {s.resources.min_vcpu}"),
    ("too little memory", lambda o, s, v: f"{o.memory_gb} GB memory, the job needs {s.resources.min_memory_gb}"),
    ("too little disk", lambda o, s, v: f"{o.disk_gb} GB disk, the job needs {s.resources.disk_gb}"),
    ("over max price", lambda o, s, v: (
        f"${o.price_per_hour:.2f}/h is over the maximum ${s.placement.max_price_per_hour or 0:.2f}/h")),
    ("no volume support", lambda o, s, v: "the offer cannot attach a volume and the job has one"),
    ("away from the volume", lambda o, s, v: f"the job's volume lives in {_where(v)}"),
    ("unavailable", lambda o, s, v: "the provider reports no capacity left"),
    ("just failed: no capacity", lambda o, s, v: "just failed: no capacity"),
)
_WANTED = {
    CapacityPreference.SPOT: {CapacityType.SPOT},
    CapacityPreference.ON_DEMAND: {CapacityType.ON_DEMAND},
    CapacityPreference.AUTO: {CapacityType.SPOT, CapacityType.ON_DEMAND},
}


def _failures(spec: JobSpec, idx: OfferIndex, volume: VolumeLocation | None,
              exclude: frozenset[str]) -> list[np.ndarray | None]:
    """One boolean column per filter of _FILTERS (None: the filter does not apply to this job):
    which offers fail it."""
    res, pl = spec.resources, spec.placement
    fails: list[np.ndarray | None] = [None] * len(_FILTERS)
    if pl.providers is not None:
        fails[0] = ~idx.rows_where(idx.provider, idx.provider_names, set(pl.providers).__contains__)
    if pl.regions is not None:
        regions = pl.regions
        fails[1] = ~idx.rows_where(idx.region, idx.region_names, lambda r: _region_allowed(r, regions))
    wanted = _WANTED[pl.capacity]
    if CapacityType.SPOT not in wanted:
        fails[2] = idx.spot
    elif CapacityType.ON_DEMAND not in wanted:
        fails[2] = ~idx.spot
    if res.gpu_count > 0:
        fails[3] = (idx.gpu < 0) | (idx.gpu_count <= 0)
        if res.gpu is not None:
            fails[4] = ~idx.rows_where(idx.gpu, idx.gpu_names, set(res.gpu).__contains__)
        fails[5] = idx.gpu_count < res.gpu_count
        if res.min_vram_gb is not None:
            fails[6] = idx.vram < res.min_vram_gb
        if res.min_cuda is not None:
            fails[7] = (idx.cuda >= 0) & (idx.cuda < cuda_code(res.min_cuda))
    if res.min_vcpu:
        fails[8] = (idx.vcpu > 0) & (idx.vcpu < res.min_vcpu)
    if res.min_memory_gb:
        fails[9] = (idx.memory > 0) & (idx.memory < res.min_memory_gb)
    fails[10] = (idx.disk > 0) & (idx.disk < res.disk_gb)
    if pl.max_price_per_hour is not None:
        fails[11] = idx.price > pl.max_price_per_hour
    if volume is not None:
        fails[12] = ~idx.volumes
        if volume.exists:
            away = ~idx.rows_where(idx.provider, idx.provider_names, lambda p: p == volume.provider)
            if volume.region is not None:
                away |= ~idx.rows_where(idx.region, idx.region_names, lambda r: r == volume.region)
            fails[13] = away
    fails[14] = ~idx.has_capacity
    if exclude:
        excluded = np.zeros(len(idx), dtype=bool)
        for key in exclude:
            excluded[idx.positions.get(key, [])] = True
        fails[15] = excluded
    return fails


def _first_failure(fails: list[np.ndarray | None], n: int) -> np.ndarray:
    """Per offer: 0 when it passes every filter, else 1 + the index of the first it fails."""
    codes = np.zeros(n, dtype=np.int8)
    for i in range(len(fails) - 1, -1, -1):  # the earliest failing filter is written last: it wins
        mask = fails[i]
        if mask is not None:
            codes[mask] = i + 1
    return codes


class _Rejections:
    """One placement's rejected offers. Sentences are written on first read only: a catalogue
    of 100,000 offers rejects most of them, and nobody reads most of those sentences."""

    def __init__(self, idx: OfferIndex, codes: np.ndarray, spec: JobSpec, volume: VolumeLocation | None) -> None:
        self._idx, self._codes, self._spec, self._volume = idx, codes, spec, volume
        self._built: tuple[Rejection, ...] | None = None

    def _label(self, code: int) -> str:
        label = _FILTERS[code - 1][0]
        return f"{label} in {_where(self._volume)}" if label == "away from the volume" else label

    def counts(self) -> tuple[tuple[str, int], ...]:
        """(label, how many), labels in the order the offers first meet them."""
        codes = self._codes[self._codes > 0]
        if not len(codes):
            return ()
        values, first, counts = np.unique(codes, return_index=True, return_counts=True)
        merged: dict[str, list[int]] = {}
        for value, pos, count in zip(values.tolist(), first.tolist(), counts.tolist(), strict=True):
            entry = merged.setdefault(self._label(value), [pos, 0])
            entry[0], entry[1] = min(entry[0], pos), entry[1] + count
        return tuple((label, n) for label, (_, n) in sorted(merged.items(), key=lambda kv: kv[1][0]))

    def all(self) -> tuple[Rejection, ...]:
        if self._built is None:
            out = []
            for pos in np.flatnonzero(self._codes).tolist():
                code = int(self._codes[pos])
                offer = self._idx.offers[pos]
                sentence = _FILTERS[code - 1][1](offer, self._spec, self._volume)
                out.append(Rejection(offer, f"{_describe(offer)}: {sentence}", self._label(code)))
            self._built = tuple(out)
        return self._built


@dataclass(frozen=True)
class PlacementResult:
    candidates: tuple[Candidate, ...]  # best first (only the best `limit` when place() had one)
    suitable: int = 0  # how many offers passed every filter
    rejected_counts: tuple[tuple[str, int], ...] = ()  # (label, how many), in first-met order
    _rejections: _Rejections | None = field(default=None, compare=False, repr=False)

    @property
    def rejected(self) -> tuple[Rejection, ...]:
        """Every rejected offer with its sentence, in the order the offers were given."""
        return self._rejections.all() if self._rejections is not None else ()

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def summary(self) -> str:
        """E.g. "12 offers: 3 suitable; rejected 5 wrong GPU, 2 over max price"."""
        total = self.suitable + sum(n for _, n in self.rejected_counts)
        text = f"{total} offer{'' if total == 1 else 's'}: {self.suitable} suitable"
        if not self.rejected_counts:
            return text
        groups = sorted(self.rejected_counts, key=lambda kv: -kv[1])  # stable: ties stay first-met
        return text + "; rejected " + ", ".join(f"{n} {kind}" for kind, n in groups)


def _rate_tables(idx: OfferIndex, settings: PlacementSettings,
                 stats: Mapping[tuple[str, CapacityType], RateStats]) -> tuple[np.ndarray, np.ndarray]:
    """Preemption rate per (provider code, spot) and restart overhead in hours per provider code:
    worked out once per provider, not once per offer."""
    rate = np.zeros((len(idx.provider_names), 2), dtype=np.float64)
    restart_h = np.zeros(len(idx.provider_names), dtype=np.float64)
    for code, name in enumerate(idx.provider_names):
        for col, capacity in ((0, CapacityType.ON_DEMAND), (1, CapacityType.SPOT)):
            key = (name, capacity)
            rate[code, col] = preemption_rate(settings.prior_rate(*key), settings.prior_weight_hours, stats.get(key))
        restart_h[code] = settings.restart_overhead(name) / 3600
    return rate, restart_h


def _shortlist(keys: list[np.ndarray], limit: int) -> np.ndarray:
    """Positions of the best `limit` rows by the numeric keys (lexicographic), plus every row
    tied with the last of them on all keys: the string tie-breaks are settled afterwards by a
    full sort of these few. Linear time: one partition per key, never a sort of the whole."""
    n = len(keys[0]) if keys else 0
    if n <= limit or not keys:
        return np.arange(n)
    first = keys[0]
    threshold = np.partition(first, limit - 1)[limit - 1]
    less = np.flatnonzero(first < threshold)
    equal = np.flatnonzero(first == threshold)
    need = limit - len(less)
    chosen = equal[_shortlist([k[equal] for k in keys[1:]], need)] if keys[1:] else equal
    return np.concatenate((less, chosen))


def place(
    spec: JobSpec,
    offers: Sequence[Offer] | OfferIndex,
    volume: VolumeLocation | None,
    stats: Mapping[tuple[str, CapacityType], RateStats],
    settings: PlacementSettings,
    exclude: frozenset[str] = frozenset(),
    limit: int | None = None,
) -> PlacementResult:
    """Every offer either passes every filter (a ranked Candidate, best first) or is rejected
    with the reason of the first filter it fails.

    `offers` is a list, or an OfferIndex built from one (the engine keeps one per offer
    refresh). `volume` is None when the job has no volume. `exclude` holds "provider:offer_id"
    keys of offers that just failed for lack of capacity. With `limit`, only the best `limit`
    candidates are returned, found by a partial sort (the engine tries 8).
    """
    idx = offers if isinstance(offers, OfferIndex) else OfferIndex.build(offers)
    codes = _first_failure(_failures(spec, idx, volume, exclude), len(idx))
    rejections = _Rejections(idx, codes, spec, volume)
    ok = np.flatnonzero(codes == 0)
    if limit is not None and limit <= 0:
        return PlacementResult((), len(ok), rejections.counts(), rejections)
    cpu_only = spec.resources.gpu_count == 0
    if limit is not None and len(ok) > 4 * limit:
        rate, restart_h = _rate_tables(idx, settings, stats)
        half_h = spec.policy.checkpoint_interval / 2 / 3600
        prov, spot = idx.provider[ok], idx.spot[ok]
        # the same arithmetic as _expected, in the same order, on every suitable offer at once
        cost = np.round(idx.price[ok] * (1 + rate[prov, spot.astype(np.int64)] * (restart_h[prov] + half_h)), 9)
        gpus = idx.gpu_count[ok]
        keys = [gpus, cost] if cpu_only else [cost, gpus]
        ok = np.sort(ok[_shortlist([*keys, spot.astype(np.int64)], limit)])
    ranked = []
    for pos in ok.tolist():
        offer = idx.offers[pos]
        cost_h, rate_h, reason = _expected(offer, settings, stats, spec.policy.checkpoint_interval)
        ranked.append((_sort_key(offer, cost_h, cpu_only), Candidate(offer, cost_h, rate_h, reason)))
    ranked.sort(key=lambda pair: pair[0])
    best = tuple(c for _, c in ranked)[:limit]
    return PlacementResult(best, int(np.count_nonzero(codes == 0)), rejections.counts(), rejections)


# Filters whose failure is forever, whatever capacity or prices do: what the job asks of the
# machine itself (indices into _FILTERS). Price, availability, the volume's current place and a
# just-failed offer can all change; a GPU model nobody offers cannot.
_STATIC = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12)


def never_satisfiable(spec: JobSpec, offers: Sequence[Offer] | OfferIndex) -> str | None:
    """Why no offer could ever run `spec` (a sentence naming what the providers do offer), or
    None when some offer could, given capacity and a price. Pure; used at submit so that a
    job nobody can run is refused instead of queued forever."""
    idx = offers if isinstance(offers, OfferIndex) else OfferIndex.build(offers)
    if not len(idx):
        return None  # nothing known yet: no grounds to refuse
    volume = VolumeLocation(None, None) if spec.volume is not None else None
    fails = _failures(spec, idx, volume, frozenset())
    never = np.zeros(len(idx), dtype=bool)
    for i in _STATIC:
        mask = fails[i]
        if mask is not None:
            never |= mask
    if not never.all():
        return None
    codes = _first_failure([fails[i] if i in _STATIC else None for i in range(len(_FILTERS))], len(idx))
    why = _Rejections(idx, codes, spec, volume).counts()
    reasons = ", ".join(f"{n} {label}" for label, n in sorted(why, key=lambda kv: -kv[1]))
    return f"no configured provider offers what this job asks for ({len(idx)} offers: {reasons}); {_offered(idx)}"


def _offered(idx: OfferIndex) -> str:
    """What each provider offers, in words: "runpod offers A100-80GB, H100-SXM; local offers CPU only"."""
    parts = []
    for code, provider in enumerate(idx.provider_names):
        rows = idx.provider == code
        gpus = sorted({idx.gpu_names[g] for g in idx.gpu[rows].tolist() if g >= 0})
        shown = ", ".join(gpus[:8]) + (f" and {len(gpus) - 8} more" if len(gpus) > 8 else "")
        has_cpu = bool((idx.gpu[rows] < 0).any())
        what = shown + (" and CPU-only machines" if has_cpu and gpus else "") if gpus else "CPU-only machines"
        parts.append(f"{provider} offers {what}")
    return "; ".join(parts)


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
