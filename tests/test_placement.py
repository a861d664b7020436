"""Placement: every filter with its reason, expected-cost ranking, rate learning, volume pinning."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.models import CapacityType, JobSpec, Offer
from orchestrator.placement import (
    PlacementSettings,
    RateStats,
    VolumeLocation,
    place,
    preemption_rate,
    rank_offers_for_display,
)

SPOT, OD = CapacityType.SPOT, CapacityType.ON_DEMAND
NO_STATS: dict[tuple[str, CapacityType], RateStats] = {}
SETTINGS = PlacementSettings()


def offer(**kw: Any) -> Offer:
    base: dict[str, Any] = dict(
        provider="runpod", offer_id="o1", region="EU-RO-1", gpu="RTX-4090", gpu_count=1,
        vram_gb=24, vcpu=8, memory_gb=32, disk_gb=0, capacity=OD, price_per_hour=0.50,
    )
    base.update(kw)
    return Offer(**base)


def spec(resources: dict[str, Any] | None = None, placement: dict[str, Any] | None = None,
         **extra: Any) -> JobSpec:
    data: dict[str, Any] = {"name": "j", "command": ["python", "train.py"], **extra}
    if resources is not None:
        data["resources"] = resources
    if placement is not None:
        data["placement"] = placement
    return JobSpec.model_validate(data)


# --------------------------------------------------------------------------- filters

FILTERS = [
    # (spec kwargs, offer overrides, volume, exclude, expected kind or None = accepted)
    ({"placement": {"providers": ["aws"]}}, {}, None, (), "provider not allowed"),
    ({"placement": {"providers": ["runpod"]}}, {}, None, (), None),
    ({"placement": {"regions": ["us-east-1"]}}, {}, None, (), "region not allowed"),
    ({"placement": {"regions": ["us-east-1"]}}, {"region": "us-east-1a"}, None, (), None),
    ({"placement": {"regions": ["EU"]}}, {}, None, (), None),
    ({"placement": {"regions": ["EU-RO-1"]}}, {}, None, (), None),
    ({"placement": {"capacity": "spot"}}, {"capacity": OD}, None, (), "wrong capacity type"),
    ({"placement": {"capacity": "spot"}}, {"capacity": SPOT}, None, (), None),
    ({"placement": {"capacity": "on-demand"}}, {"capacity": SPOT}, None, (), "wrong capacity type"),
    ({"placement": {"capacity": "auto"}}, {"capacity": SPOT}, None, (), None),
    ({"placement": {"capacity": "auto"}}, {"capacity": OD}, None, (), None),
    ({"resources": {"gpu": ["H100"]}}, {}, None, (), "wrong GPU"),
    ({"resources": {"gpu": ["H100", "4090"]}}, {}, None, (), None),
    ({}, {"gpu": None, "gpu_count": 0, "vram_gb": 0}, None, (), "wrong GPU"),
    ({"resources": {"gpu_count": 2}}, {}, None, (), "too few GPUs"),
    ({"resources": {"gpu_count": 2}}, {"gpu_count": 4}, None, (), None),
    ({"resources": {"min_vram_gb": 40}}, {}, None, (), "too little VRAM"),
    ({"resources": {"min_vram_gb": 24}}, {}, None, (), None),
    ({"resources": {"min_vram_gb": 40}}, {"gpu": "H100-SXM", "vram_gb": 0}, None, (), None),
    ({"resources": {"min_cuda": "12.4"}}, {"max_cuda": "12.2"}, None, (), "host CUDA too old"),
    ({"resources": {"min_cuda": "12.4"}}, {"max_cuda": "12.10"}, None, (), None),  # 12.10 > 12.4
    ({"resources": {"min_cuda": "12.4"}}, {"max_cuda": "12.4"}, None, (), None),
    ({"resources": {"min_cuda": "12.4"}}, {}, None, (), None),  # unknown: the adapter filters at launch
    ({"resources": {"min_vcpu": 16}}, {}, None, (), "too few vCPUs"),
    ({"resources": {"min_vcpu": 16}}, {"vcpu": 0}, None, (), None),
    ({"resources": {"min_memory_gb": 64}}, {}, None, (), "too little memory"),
    ({"resources": {"min_memory_gb": 64}}, {"memory_gb": 0}, None, (), None),
    ({"resources": {"disk_gb": 100}}, {"disk_gb": 50}, None, (), "too little disk"),
    ({"resources": {"disk_gb": 100}}, {"disk_gb": 0}, None, (), None),
    ({"resources": {"disk_gb": 100}}, {"disk_gb": 100}, None, (), None),
    ({"placement": {"max_price_per_hour": 0.4}}, {}, None, (), "over max price"),
    ({"placement": {"max_price_per_hour": 0.5}}, {}, None, (), None),
    ({}, {"available": 0}, None, (), "unavailable"),
    ({}, {}, None, ("runpod:o1",), "just failed: no capacity"),
    ({}, {}, None, ("runpod:o2", "aws:o1"), None),
    # volume pinning
    ({}, {}, VolumeLocation("runpod", "US-TX-3"), (), "away from the volume in runpod/US-TX-3"),
    ({}, {"provider": "aws"}, VolumeLocation("runpod", "EU-RO-1"), (), "away from the volume in runpod/EU-RO-1"),
    ({}, {}, VolumeLocation("runpod", "EU-RO-1"), (), None),
    ({}, {"supports_volumes": False}, VolumeLocation("runpod", "EU-RO-1"), (), "no volume support"),
    ({}, {"supports_volumes": False}, VolumeLocation(None, None), (), "no volume support"),
    ({}, {"provider": "aws", "region": "us-east-1a"}, VolumeLocation(None, None), (), None),
    ({}, {"supports_volumes": False}, None, (), None),
]


@pytest.mark.parametrize(("spec_kw", "offer_kw", "volume", "exclude", "kind"), FILTERS)
def test_filters(spec_kw: dict[str, Any], offer_kw: dict[str, Any], volume: VolumeLocation | None,
                 exclude: tuple[str, ...], kind: str | None) -> None:
    o = offer(**offer_kw)
    result = place(spec(**spec_kw), [o], volume, NO_STATS, SETTINGS, frozenset(exclude))
    if kind is None:
        assert [c.offer for c in result.candidates] == [o]
        assert result.rejected == ()
    else:
        assert result.candidates == ()
        (rej,) = result.rejected
        assert rej.offer == o
        assert rej.kind == kind
        assert rej.reason.startswith(f"{o.provider} {o.region} ")


@pytest.mark.parametrize(
    "offer_kw",
    [
        {"gpu": None, "gpu_count": 0, "vram_gb": 0},
        {"gpu": "RTX-4090", "gpu_count": 1},
        {"gpu": "H100-SXM", "gpu_count": 8},
    ],
)
def test_cpu_only_job_accepts_any_machine(offer_kw: dict[str, Any]) -> None:
    o = offer(**offer_kw)
    result = place(spec({"gpu_count": 0}), [o], None, NO_STATS, SETTINGS)
    assert [c.offer for c in result.candidates] == [o]
    assert result.rejected == ()


def test_cpu_only_job_still_honours_its_other_limits() -> None:
    """Any machine means any GPU, not any size or price: the other filters still apply."""
    cpu = {"gpu": None, "gpu_count": 0, "vram_gb": 0}
    small = offer(offer_id="small", vcpu=2, **cpu)
    dear = offer(offer_id="dear", price_per_hour=5.0, **cpu)
    fits = offer(offer_id="fits", vcpu=8, price_per_hour=0.2, **cpu)
    s = spec({"gpu_count": 0, "min_vcpu": 4}, {"max_price_per_hour": 1.0})
    result = place(s, [small, dear, fits], None, NO_STATS, SETTINGS)
    assert [c.offer.offer_id for c in result.candidates] == ["fits"]
    assert {r.offer.offer_id: r.kind for r in result.rejected} == {"small": "too few vCPUs", "dear": "over max price"}


def test_cpu_only_job_prefers_fewer_gpus() -> None:
    cpu = offer(offer_id="cpu", gpu=None, gpu_count=0, vram_gb=0, price_per_hour=0.30)
    gpu1 = offer(offer_id="g1", gpu_count=1, price_per_hour=0.20)
    gpu8 = offer(offer_id="g8", gpu="H100-SXM", gpu_count=8, price_per_hour=0.10)
    result = place(spec({"gpu_count": 0}), [gpu8, gpu1, cpu], None, NO_STATS, SETTINGS)
    assert [c.offer.offer_id for c in result.candidates] == ["cpu", "g1", "g8"]


# --------------------------------------------------------------------------- preemption rate


@pytest.mark.parametrize(
    ("prior", "weight", "stats", "expected"),
    [
        (0.1, 24, None, 0.1),  # no history: the prior
        (0.1, 24, RateStats(0, 0), 0.1),
        (0.1, 24, RateStats(0, 24), 0.05),  # a clean day halves it
        (0.1, 24, RateStats(12, 24), (2.4 + 12) / 48),
        (0.0, 24, RateStats(0, 100), 0.0),  # on-demand stays ~0
        (0.2, 0, RateStats(3, 10), 0.3),  # no prior weight: the observed rate
        (0.2, 0, None, 0.2),
    ],
)
def test_preemption_rate(prior: float, weight: float, stats: RateStats | None, expected: float) -> None:
    assert preemption_rate(prior, weight, stats) == pytest.approx(expected)


def test_more_preemptions_raise_the_rate() -> None:
    rates = [preemption_rate(0.05, 24, RateStats(n, 48)) for n in (0, 1, 5, 20)]
    assert rates == sorted(rates) and rates[0] < rates[-1]


# --------------------------------------------------------------------------- ranking


def _spot_vs_on_demand(spot_rate: float, interval: float) -> str:
    spot = offer(provider="runpod", offer_id="s", capacity=SPOT, price_per_hour=0.40)
    od = offer(provider="aws", offer_id="d", region="us-east-1a", capacity=OD, price_per_hour=0.50)
    settings = PlacementSettings(prior_rates={("runpod", SPOT): spot_rate})
    s = spec(policy={"checkpoint_interval": interval})
    result = place(s, [spot, od], None, NO_STATS, settings)
    return result.candidates[0].offer.offer_id


@pytest.mark.parametrize(
    ("rate", "interval", "winner"),
    [
        (3.0, 600, "d"),  # preempted three times an hour: the dearer on-demand wins
        (0.05, 600, "s"),  # rarely preempted: the cheaper spot wins
        (0.3, 600, "s"),  # 0.40 * (1 + 0.3 * (0.033 + 0.083)) = 0.414 < 0.50
        (0.3, 4 * 3600, "d"),  # a four-hour checkpoint interval tips it: 0.40 * 1.61 = 0.64
    ],
)
def test_expected_cost_ranking(rate: float, interval: float, winner: str) -> None:
    assert _spot_vs_on_demand(rate, interval) == winner


def test_learned_history_flips_the_choice() -> None:
    spot = offer(offer_id="s", capacity=SPOT, price_per_hour=0.40)
    od = offer(offer_id="d", capacity=OD, price_per_hour=0.50)
    s = spec()
    calm = place(s, [spot, od], None, NO_STATS, SETTINGS)
    assert calm.candidates[0].offer.offer_id == "s"
    stormy = {("runpod", SPOT): RateStats(preemptions=200, hours=20)}
    assert place(s, [spot, od], None, stormy, SETTINGS).candidates[0].offer.offer_id == "d"


def test_candidate_carries_the_arithmetic() -> None:
    settings = PlacementSettings(prior_rates={("runpod", SPOT): 0.3}, restart_overhead_seconds={"runpod": 108})
    o = offer(capacity=SPOT, price_per_hour=0.35)
    (c,) = place(spec(), [o], None, NO_STATS, settings).candidates
    assert c.rate_per_hour == pytest.approx(0.3)
    assert c.expected_cost_per_hour == pytest.approx(0.35 * (1 + 0.3 * (0.03 + 300 / 3600)))
    assert c.reason == (
        "runpod EU-RO-1 RTX-4090 x1 spot $0.35/h; expected $0.36/h "
        "(0.300 preemptions/h x (0.03 h restart + 0.08 h half checkpoint interval))"
    )


@pytest.mark.parametrize(
    ("offers", "order"),
    [
        # equal expected cost: fewer GPUs first
        ([offer(offer_id="b", gpu_count=2), offer(offer_id="a", gpu_count=1)], ["a", "b"]),
        # equal cost and GPUs: on-demand before spot (spot prior 0 here)
        ([offer(offer_id="a", capacity=SPOT), offer(offer_id="b", capacity=OD)], ["b", "a"]),
        # then provider, region, offer id
        ([offer(provider="vast", offer_id="a"), offer(provider="aws", offer_id="z")], ["z", "a"]),
        ([offer(region="US", offer_id="a"), offer(region="EU", offer_id="b")], ["b", "a"]),
        ([offer(offer_id="b"), offer(offer_id="a"), offer(offer_id="c")], ["a", "b", "c"]),
    ],
)
def test_deterministic_tie_break(offers: list[Offer], order: list[str]) -> None:
    settings = PlacementSettings(default_spot_rate=0.0)
    for seq in (offers, list(reversed(offers))):
        result = place(spec(), seq, None, NO_STATS, settings)
        assert [c.offer.offer_id for c in result.candidates] == order


def test_rank_offers_for_display() -> None:
    spot = offer(offer_id="s", capacity=SPOT, price_per_hour=0.40, gpu="H100-SXM")
    od = offer(offer_id="d", capacity=OD, price_per_hour=0.45)
    settings = PlacementSettings(prior_rates={("runpod", SPOT): 2.0})
    ranked = rank_offers_for_display([spot, od], settings, NO_STATS)
    assert [o.offer_id for o, _ in ranked] == ["d", "s"]
    assert ranked[0][1] == pytest.approx(0.45)
    assert ranked[1][1] == pytest.approx(0.40 * (1 + 2.0 * (120 + 300) / 3600))


# --------------------------------------------------------------------------- summary


def test_summary() -> None:
    offers = [
        *(offer(offer_id=f"ok{i}") for i in range(3)),
        *(offer(offer_id=f"gpu{i}", gpu="T4", vram_gb=16) for i in range(5)),
        *(offer(offer_id=f"dear{i}", price_per_hour=9) for i in range(2)),
        *(offer(offer_id=f"far{i}", region="US-TX-3") for i in range(2)),
    ]
    s = spec({"gpu": ["RTX-4090", "T4"], "min_vram_gb": 20}, {"max_price_per_hour": 1})
    result = place(s, offers, VolumeLocation("runpod", "EU-RO-1"), NO_STATS, SETTINGS)
    assert result.summary() == (
        "12 offers: 3 suitable; rejected 5 too little VRAM, 2 over max price, "
        "2 away from the volume in runpod/EU-RO-1"
    )
    assert result.best is not None and result.best.offer.offer_id == "ok0"


@pytest.mark.parametrize(
    ("offers", "text"),
    [
        ([], "0 offers: 0 suitable"),
        ([offer()], "1 offer: 1 suitable"),
        ([offer(available=0)], "1 offer: 0 suitable; rejected 1 unavailable"),
    ],
)
def test_summary_edges(offers: list[Offer], text: str) -> None:
    assert place(spec(), offers, None, NO_STATS, SETTINGS).summary() == text


def _forbidden(what: str) -> Any:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError(f"place() used {what}: a placement decision must not")
    return refuse


def test_place_is_pure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same inputs, same answer; inputs left as they were; no clock, no files, no network, no
    randomness, no environment read while it decides."""
    offers = [
        offer(offer_id="z", capacity=SPOT, price_per_hour=0.30),
        replace(offer(), offer_id="b", region="US-TX-3"),
        offer(offer_id="a", gpu="H100-SXM", gpu_count=8, price_per_hour=4.0),
        offer(offer_id="c", available=0),
        offer(offer_id="d", provider="aws", region="us-east-1a", capacity=SPOT, price_per_hour=0.35),
    ]
    s = spec({"gpu": ["RTX-4090", "H100"]}, {"max_price_per_hour": 5})
    volume = VolumeLocation("runpod", "EU-RO-1")
    stats = {("runpod", SPOT): RateStats(preemptions=3, hours=10)}
    settings = PlacementSettings(prior_rates={("aws", SPOT): 0.2}, restart_overhead_seconds={"runpod": 90})
    exclude = frozenset({"runpod:b"})
    args = (s, offers, volume, stats, settings, exclude)
    before = copy.deepcopy(args)

    import builtins
    import io
    import os
    import random
    import socket
    import time

    with monkeypatch.context() as m:
        for module, names in (
            (time, ("time", "monotonic", "perf_counter", "time_ns", "localtime", "gmtime", "sleep")),
            (builtins, ("open", "input")),
            (io, ("open",)),
            (os, ("getenv", "listdir", "stat", "urandom")),
            (random, ("random", "randint", "choice", "shuffle")),
            (socket, ("socket", "create_connection", "getaddrinfo")),
        ):
            for name in names:
                m.setattr(module, name, _forbidden(f"{module.__name__}.{name}"))
        m.setattr(os, "environ", _ForbiddenEnviron())
        first = place(*args)
        second = place(*args)

    assert first == second
    assert args == before, "place() changed its inputs"
    assert [o.offer_id for o in offers] == ["z", "b", "a", "c", "d"], "place() reordered the caller's list"
    assert [c.offer.offer_id for c in first.candidates] == ["z", "a"]  # not vacuous: it did decide


class _ForbiddenEnviron(dict[str, str]):
    def __getitem__(self, key: str) -> str:
        raise AssertionError(f"place() read the environment ({key})")

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        raise AssertionError(f"place() read the environment ({key})")


# --------------------------------------------------------------------------- catalogue scale


def _random_catalogue(seed: int, n: int) -> list[Offer]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):  # few distinct values, so that ties on every numeric key are common
        gpu = rng.choice(["RTX-4090", "H100-SXM", None])
        out.append(offer(
            provider=rng.choice(["runpod", "aws", "vast"]), offer_id=f"o{rng.randrange(n)}",
            region=rng.choice(["EU-RO-1", "US-TX-3", "us-east-1a"]), gpu=gpu,
            gpu_count=0 if gpu is None else rng.choice([1, 2, 8]), vram_gb=0 if gpu is None else 24,
            capacity=rng.choice([SPOT, OD]), price_per_hour=rng.choice([0.3, 0.5, 0.5, 1.0]),
            available=rng.choice([0, 1, 3]), max_cuda=rng.choice([None, "11.8", "12.4"]),
        ))
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("limit", [1, 3, 8])
def test_the_best_few_of_a_catalogue_are_the_head_of_its_full_ranking(seed: int, limit: int) -> None:
    """The engine asks for the best 8 of a catalogue (a partial sort with its own tie rules);
    they must be exactly the first 8 of the whole ranking, ties and string tie-breaks included."""
    offers = _random_catalogue(seed, 300)
    settings = PlacementSettings(prior_rates={("aws", SPOT): 0.2}, restart_overhead_seconds={"vast": 600})
    stats = {("runpod", SPOT): RateStats(preemptions=4, hours=10)}
    for s in (spec(), spec({"gpu_count": 0}), spec({"min_cuda": "12.0"}, {"max_price_per_hour": 0.9})):
        whole = place(s, offers, None, stats, settings)
        few = place(s, offers, None, stats, settings, limit=limit)
        assert len(whole.candidates) > 4 * limit, "the partial sort was not exercised"
        assert few.candidates == whole.candidates[:limit]
        assert few.summary() == whole.summary()
        assert len(few.rejected) == len(whole.rejected) and few.rejected == whole.rejected


def test_an_index_built_once_serves_every_placement() -> None:
    from orchestrator.offer_index import OfferIndex

    offers = _random_catalogue(1, 200)
    index = OfferIndex.build(offers)
    for s in (spec(), spec({"gpu": ["H100"]}), spec(placement={"regions": ["EU"]})):
        for volume in (None, VolumeLocation("aws", "us-east-1a")):
            assert place(s, index, volume, NO_STATS, SETTINGS) == place(s, offers, volume, NO_STATS, SETTINGS)


# --------------------------------------------------------------------------- jobs that can never run


def test_a_job_no_offer_could_ever_run_is_named_with_what_is_offered() -> None:
    from orchestrator.placement import never_satisfiable

    offers = [offer(offer_id="a", gpu="A100-80GB", vram_gb=80, available=0),
              offer(offer_id="b", provider="local", gpu=None, gpu_count=0, vram_gb=0)]
    why = never_satisfiable(spec({"gpu": ["H100"]}), offers)
    assert why is not None and "wrong GPU" in why
    assert "runpod offers A100-80GB" in why and "local offers CPU-only machines" in why
    # the default job wants one GPU; a machine without any can never run it
    assert never_satisfiable(spec(), [offers[1]]) is not None


@pytest.mark.parametrize(("spec_kw", "offer_kw"), [
    ({}, {"available": 0}),  # sold out now: may come back
    ({"placement": {"max_price_per_hour": 0.1}}, {}),  # too dear now: prices move
    ({"resources": {"gpu": ["RTX-4090"]}}, {}),
    ({"resources": {"gpu_count": 0}}, {"gpu": None, "gpu_count": 0, "vram_gb": 0}),
])
def test_a_job_that_could_run_some_day_is_not_refused(spec_kw: dict[str, Any], offer_kw: dict[str, Any]) -> None:
    from orchestrator.placement import never_satisfiable

    assert never_satisfiable(spec(**spec_kw), [offer(**offer_kw)]) is None
    assert never_satisfiable(spec(**spec_kw), []) is None  # nothing known: no grounds to refuse


def test_a_volume_job_needs_an_offer_that_can_carry_a_volume() -> None:
    from orchestrator.placement import never_satisfiable

    community = offer(region="RO", supports_volumes=False)
    with_volume = spec(volume={"name": "ckpt", "size_gb": 10})
    why = never_satisfiable(with_volume, [community])
    assert why is not None and "no volume support" in why
    assert never_satisfiable(with_volume, [community, offer(offer_id="s", region="EU-RO-1")]) is None
