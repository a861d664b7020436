"""The daemon's garbage collector policy: young generations collected often and cheaply, full
collections on the daemon's own schedule.

A full collection walks every tracked object, and at 10,000 jobs the daemon holds hundreds of
thousands (each job's parsed spec alone is about fifteen). Left to Python's thresholds, one ran
every few seconds under a burst of submits and stalled the event loop 100-175 ms each time: the
API's p99 (issue 9). Objects made at start-up are frozen out of collection; the young
generations are collected as usual (most garbage, cycles included, dies young); the oldest is
collected only by `full_collections`, every `FULL_EVERY_SECONDS`, so a long-lived cycle that
became garbage waits at most that long (bench/churn_memory.py measures that memory stays flat).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("gpuhop.daemon")

FULL_EVERY_SECONDS = 300.0
NEVER = 2**30  # gen2's threshold: collections of gen1 between two automatic full collections


def tune_gc() -> None:
    """Freeze what start-up made; collect the youngest generation per 50,000 allocations (a
    tick's short-lived objects mostly die by reference count first) and the middle one every
    5th time; never an automatic full collection. Measured (bench/tick_scale.py,
    bench/api_submits.py): per 20,000 allocations, the 100 launches after a preemption took
    half a second longer (detection p50 1.1-1.3 s against 0.7 s), and the API's p99 was no
    better; with the middle generation collected every 20th time, one pass took 100+ ms."""
    gc.freeze()
    gc.set_threshold(50_000, 5, NEVER)


def full_collection() -> float:
    """One full collection; returns how long it took (seconds)."""
    began = time.perf_counter()
    gc.collect()
    return time.perf_counter() - began


async def full_collections(stop: asyncio.Event, every: float = FULL_EVERY_SECONDS) -> None:
    """A full collection every `every` seconds until `stop`."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            took = full_collection()
            log.debug("full garbage collection: %.0f ms", took * 1000)
