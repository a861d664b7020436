"""How late the event loop runs: a timer set every LAG_PERIOD_SECONDS, and how much later than
asked it fired, into `gpuhop_event_loop_lag_seconds`. Everything the daemon does shares one
loop (the API, agents' reports, the tick), so this is the figure that says whether a slow answer
was the loop being busy (a long tick, a collection, a burst) or the work itself."""

from __future__ import annotations

import asyncio
import time

from orchestrator import metrics

LAG_PERIOD_SECONDS = 0.02


async def watch_loop_lag(stop: asyncio.Event, period: float = LAG_PERIOD_SECONDS) -> None:
    while not stop.is_set():
        asked = time.monotonic()
        await asyncio.sleep(period)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, time.monotonic() - asked - period))
