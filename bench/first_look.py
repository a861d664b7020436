"""The engine's first look at new jobs (issue 9, goal 4: what the engine takes from the API's
CPU while a thousand submits a second arrive). The real Engine on a real Store (SQLite, or
PostgreSQL with --postgres) over the in-process fake provider (tests/fake_provider.py), whose
only offer has no capacity left, so no job can be placed: --jobs jobs are stored at once, then
the daemon's loop (`Engine.run`, tick 1 s) looks at each, finds nothing fits, and writes its
"waiting for capacity" note. Prints the CPU seconds (process time: the loop and the store's
threads) per job and the wall time until every job has its note, median of --runs runs, and
how many commits those notes took.

    python bench/first_look.py [--jobs 10000] [--runs 3] [--postgres]

A benchmark, not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._pg import fresh_schema  # noqa: E402
from orchestrator.collector import tune_gc  # noqa: E402
from orchestrator.models import JobSpec  # noqa: E402
from orchestrator.store.repo import NewJob  # noqa: E402
from tests.fake_provider import FakeAdapter, Rig  # noqa: E402

SPEC = JobSpec.model_validate({"name": "sweep", "command": ["python3", "train.py"],
                               "resources": {"gpu": ["RTX-4090"]}})


async def one_run(root: Path, jobs: int, store_url: str | None) -> tuple[float, float, int]:
    fake = FakeAdapter.create(root, capacity={"r1": 0}, prices={"r1": 0.5})
    rig = Rig.create(root, fake, store_url=store_url, tick_seconds=1.0, offer_refresh_seconds=30.0,
                     retry_backoff_max_seconds=300.0)
    commits = 0
    real = rig.store.apply_many

    def counting(items: Any) -> Any:
        nonlocal commits
        commits += any(kind == "no_capacity" for *_, events in items for _, kind, _ in events)
        return real(items)

    rig.store.apply_many = counting
    try:
        for n in range(0, jobs, 500):
            rig.store.create_jobs([NewJob(f"j{i:06d}", SPEC) for i in range(n, min(n + 500, jobs))])
        stop = asyncio.Event()
        cpu, wall = time.process_time(), time.perf_counter()
        loop = asyncio.create_task(rig.engine.run(stop))
        while True:
            await asyncio.sleep(0.05)
            left = await rig.store.run(_without_note, rig.store)
            if not left:
                break
            if time.perf_counter() - wall > 600:
                raise SystemExit(f"{left} jobs still without a note after 600 s")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stop.set()
        await loop
        return cpu, wall, commits
    finally:
        rig.close()


def _without_note(store: Any) -> int:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM jobs WHERE next_try_at IS NULL")).scalar_one())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL on 127.0.0.1:5432 (database test)")
    args = ap.parse_args()
    tune_gc()
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="gpuhop-first-look-") as tmp:
            url = fresh_schema("bench_first_look") if args.postgres else None
            cpu, wall, commits = asyncio.run(one_run(Path(tmp), args.jobs, url))
        results.append((cpu, wall, commits))
        print(f"  run {run + 1}: {cpu / args.jobs * 1e6:.0f} us of CPU per job, every note written after "
              f"{wall:.2f} s, in {commits} commits", flush=True)
    cpu = statistics.median(r[0] for r in results)
    wall = statistics.median(r[1] for r in results)
    print(f"first look at {args.jobs:,} new jobs that nothing fits ({'PostgreSQL' if args.postgres else 'SQLite'}): "
          f"{cpu / args.jobs * 1e6:.0f} us of CPU per job, every note written after {wall:.2f} s (medians of "
          f"{args.runs} runs)")


if __name__ == "__main__":
    main()
