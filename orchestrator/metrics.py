"""Prometheus metrics, defined once on a registry of the daemon's own (tests can start several
daemons in one process without clashing). Served at /metrics."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)

TICK_SECONDS = Histogram("gpuhop_tick_seconds", "Duration of one reconcile tick", registry=REGISTRY)
TICK_ERRORS = Counter("gpuhop_tick_errors_total", "Reconcile ticks that raised", registry=REGISTRY)
PROVIDER_UP = Gauge("gpuhop_provider_up", "1 if the provider's last listing succeeded", ["provider"], registry=REGISTRY)
PROVIDER_ERRORS = Counter(
    "gpuhop_provider_errors_total", "Failed provider calls", ["provider", "call"], registry=REGISTRY
)
PROVIDER_SUSPENSIONS = Counter(
    "gpuhop_provider_suspensions_total",
    "Times a provider was suspended for launches because it stopped a machine for the account "
    "(insufficient balance)", ["provider"], registry=REGISTRY,
)
PROVIDER_SUSPENDED = Gauge(
    "gpuhop_provider_suspended", "1 while the provider is suspended for launches", ["provider"], registry=REGISTRY
)
class _Spend:
    """gpuhop_cost_usd_total{provider,capacity}: USD spent so far, ended attempts at their
    bills and live ones priced so far. A counter (it only grows: attempts are never deleted),
    read from the store at each scrape (`metrics_view` sets it just before rendering)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("gpuhop_cost_usd", "USD spent so far, by provider and capacity",
                                     labels=["provider", "capacity"])
        for (provider, capacity), value in sorted(self.values.items()):
            family.add_metric([provider, capacity], value)
        yield family


SPEND = _Spend()
REGISTRY.register(SPEND)  # type: ignore[arg-type]
LAUNCHES = Counter("gpuhop_launches_total", "Attempts launched", ["provider", "capacity"], registry=REGISTRY)
ATTEMPTS_ENDED = Counter(
    "gpuhop_attempts_ended_total", "Attempts ended, by why", ["provider", "reason"], registry=REGISTRY
)
JOBS_FINISHED = Counter("gpuhop_jobs_finished_total", "Jobs ended, by status", ["status"], registry=REGISTRY)
ORPHANS_REAPED = Counter(
    "gpuhop_orphans_reaped_total", "Instances terminated because no attempt owned them", ["provider"], registry=REGISTRY
)
DUPLICATES = Counter(
    "gpuhop_duplicate_instances_total", "Extra machines found carrying a live attempt's name (stopped)",
    ["provider"], registry=REGISTRY,
)
INTERRUPTIONS = Counter(
    "gpuhop_interruption_notices_total", "Reclaim notices received", ["provider"], registry=REGISTRY
)
JOBS = Gauge("gpuhop_jobs", "Jobs by status", ["status"], registry=REGISTRY)
API_REQUESTS = Counter(
    "gpuhop_api_requests_total", "API requests", ["method", "route", "status"], registry=REGISTRY
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
API_SECONDS = Histogram(
    "gpuhop_api_request_seconds", "Time from a request's handling start to its answer (the daemon's share)",
    ["method", "route"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
EVENT_LOOP_LAG = Histogram(
    "gpuhop_event_loop_lag_seconds", "How much later than asked the event loop ran a short timer",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
