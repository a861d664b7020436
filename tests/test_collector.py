"""The daemon's collector policy (orchestrator/collector.py): no automatic full collection, and
the oldest generation's garbage freed on the daemon's own schedule instead."""

from __future__ import annotations

import asyncio
import gc
import weakref

from orchestrator.collector import NEVER, full_collections, tune_gc


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


async def test_an_old_cycle_is_freed_by_the_scheduled_full_collection() -> None:
    thresholds = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold()[2] == NEVER  # gen2 is never collected by the thresholds
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        gc.collect(1)  # young collections promote the live cycle into the oldest generation
        gc.collect(1)
        del a, b  # now garbage, but only a full collection finds a cycle there
        gc.collect(1)
        assert gone() is not None, "a young collection freed an old cycle: the test proves nothing"
        stop = asyncio.Event()
        task = asyncio.create_task(full_collections(stop, every=0.05))
        for _ in range(200):
            if gone() is None:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert gone() is None, "the scheduled full collection did not free the old cycle"
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
