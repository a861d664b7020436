"""Memory across a job churn (issue 9, goal 5): the real Engine and Store (SQLite) over the
in-process fake provider; jobs are submitted in batches, launched, finish (exit 0) and are
reaped, batch after batch, while the process's resident memory is read after each batch.
Prints RSS after the warm-up batches and at each tenth of the churn, and the change from the
warm-up figure beside the goal (flat within 10%).

    python bench/churn_memory.py [--jobs 50000] [--batch 500]

A benchmark, not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestrator.collector import FULL_EVERY_SECONDS, full_collection, tune_gc  # noqa: E402
from orchestrator.models import JobSpec  # noqa: E402
from tests.fake_provider import FakeAdapter, Rig  # noqa: E402

SPEC = JobSpec.model_validate({"name": "churn", "command": ["python3", "train.py"],
                               "resources": {"gpu": ["RTX-4090"]}, "env": {"WANDB_MODE": "offline"}})
GOAL = 0.10


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def churn(rig: Rig, jobs: int, batch: int) -> None:
    fake = rig.fake
    rig.engine.start_providers()
    warm = max(1, min(4, jobs // batch // 5))
    baseline = None
    marks = {round(jobs * k / 10) for k in range(1, 11)}
    done = 0
    t0 = last_full = time.perf_counter()
    while done < jobs:
        ids = [f"c{done + i:07d}" for i in range(batch)]
        for job_id in ids:
            rig.store.create_job(job_id, SPEC)
        await rig.until(lambda: all(i.state.value == "running" for i in fake.live()) and len(fake.live()) == batch,
                        "the batch running", timeout=600)
        for inst in fake.live():
            fake.exit(inst.instance_id, 0)
        await rig.until(lambda: not fake.live(), "the batch finished and its machines stopped", timeout=600)
        fake.forget()  # the provider forgets terminated machines, as real ones do after a while
        done += batch
        if time.perf_counter() - last_full >= FULL_EVERY_SECONDS:  # the daemon's schedule (collector.py)
            full_collection()
            last_full = time.perf_counter()
        now = rss_mb()  # no other collection here: the daemon's own collector policy decides
        if done // batch == warm:
            baseline = now
            print(f"after {done:,} jobs (warm-up): RSS {now:.0f} MB", flush=True)
        elif baseline is not None and any(done >= m > done - batch for m in marks):
            change = (now - baseline) / baseline
            print(f"after {done:,} jobs: RSS {now:.0f} MB ({change:+.1%} from warm-up; goal within "
                  f"{GOAL:.0%}) [{time.perf_counter() - t0:.0f} s]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuhop-churn-") as tmp:
        root = Path(tmp)
        fake = FakeAdapter.create(root, capacity={"r1": args.batch * 2}, prices={"r1": 0.5})
        rig = Rig.create(root, fake, tick_seconds=0.05, offer_refresh_seconds=30.0, retry_backoff_max_seconds=1.0,
                         launch_concurrency=32, provider_concurrency=32)
        tune_gc()  # as the daemon does at start-up
        try:
            asyncio.run(churn(rig, args.jobs, args.batch))
        finally:
            rig.close()


if __name__ == "__main__":
    main()
