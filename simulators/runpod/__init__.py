"""A RunPod stand-in on loopback: RunPod's GraphQL API (so the real `runpod` SDK talks to it
unchanged), pods run as local processes, plus an admin API to preempt pods, change capacity and
prices, and inject faults. Used by tests and `gpuhop demo`; never by the daemon itself."""

from simulators.runpod.catalog import DEFAULT_CATALOG, Catalog, load_catalog
from simulators.runpod.server import RunPodSimulator, main
from simulators.runpod.world import NO_CAPACITY, NO_CAPACITY_SPOT

__all__ = [
    "DEFAULT_CATALOG",
    "NO_CAPACITY",
    "NO_CAPACITY_SPOT",
    "Catalog",
    "RunPodSimulator",
    "load_catalog",
    "main",
]
