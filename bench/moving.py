"""Waiting against moving (issue 11.2), replayed on a scripted capacity trace: prints, for a job
whose data center (r1) runs out, the time from the capacity loss to the job running again and
what finishing its remaining work cost, for

* `pinned`: `[volume] sync = "none"`: the job waits in r1 until the trace gives capacity back;
* `moves`: `sync = "object-store"` with no history: the prior says a gap is long, so it moves
  to r2 (20% dearer) and restores there;
* `learned`: `sync = "object-store"` after the daemon saw r1 come back quickly many times: the
  expected wait is short, so it waits like `pinned`.

A real Engine and Store (SQLite) drive the in-process fake provider (tests/fake_provider.py);
seconds stand for minutes of a real outage, and prices are set so that they matter at that
scale. The fake starts a machine at once, so the restore is not waited for: its estimated time
is added to the figures (and its cost is the attempt's transfer cost). Cost = the machines'
bills + the transfer + the idle time at `wait_usd_per_hour` (what waiting costs the user).

    python bench/moving.py [--outage 20] [--short 2] [--work 5]
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

from orchestrator import engine as engine_module  # noqa: E402
from orchestrator.models import JobSpec  # noqa: E402
from orchestrator.moving import MovingSettings  # noqa: E402
from orchestrator.store import AttemptRow  # noqa: E402
from tests.fake_provider import FakeAdapter, Rig  # noqa: E402

GPU = "RTX-4090"
PRICES = {"r1": 36.0, "r2": 43.2}  # $/h: a second is a cent (r1), 1.2 cents (r2)
WAIT_USD_PER_HOUR = 72.0  # an idle second costs the user two cents


def spec(sync: str) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bench", "command": ["train"], "resources": {"gpu": [GPU], "gpu_count": 1},
        "policy": {"max_relaunches": 10, "checkpoint_interval": 60},
        "volume": {"name": "ckpt", "size_gb": 20, "sync": sync},
    })


def running(rig: Rig, number: int) -> AttemptRow | None:
    return next((a for a in rig.store.attempts("j1") if a.number == number and a.status == "running"), None)


async def scenario(name: str, sync: str, outage: float, work: float, history: int) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake = FakeAdapter.create(root, capacity={"r1": 1, "r2": 4}, prices=dict(PRICES))
        rig = Rig.create(root, fake)
        # the prior: a gap lasts 60 s (a scaled hour); the restore of 20 GB at 20 GB/s takes ~1 s
        moving = MovingSettings(egress_usd_per_gb=0.001, restore_mb_per_second=20 * 1024, wait_usd_per_hour=WAIT_USD_PER_HOUR,
                                prior_wait_seconds=60.0, premium_hours=60 / 3600)
        rig.engine.workers.relocation.settings = moving
        try:
            now = time.time()
            for n in range(history):  # r1 ran out before and came back within 2 s each time
                rig.store.open_capacity_gaps([("fake", "r1", GPU)], now - 5000 + n * 30)
                rig.store.close_capacity_gaps([("fake", "r1", GPU)], now - 5000 + n * 30 + 2)
            rig.store.create_job("j1", spec(sync))
            first = await rig.until(lambda: running(rig, 1), "attempt 1 running")
            lost_at = time.time()
            fake.capacity["r1"] = 0  # the trace: r1 runs out, its machine goes with it
            fake.preempt(first.instance_id or "")
            back_at = lost_at + outage
            waited = ""
            while (second := running(rig, 2)) is None:
                message = rig.store.get_job("j1").message
                if "waiting at" in message:
                    waited = message[message.index("waiting at"):]
                if time.time() >= back_at:
                    fake.capacity["r1"] = 1  # the trace: r1 has capacity again
                await rig.step()
                await asyncio.sleep(0.02)
            resumed = time.time() - lost_at
            restore = 20 * 1024 / moving.restore_mb_per_second if second.transfer_cost_usd is not None else 0.0
            await asyncio.sleep(work + restore)  # the rest of the job's work (after its restore)
            fake.exit(second.instance_id or "", 0)
            await rig.until(lambda: (rig.store.get_job("j1").status == "succeeded"), "job succeeded")
            await rig.engine.drain()
            bills = sum(fake.bill(e.instance_id).cost_usd for e in fake.created() if e.name.endswith("-2"))
            transfer = second.transfer_cost_usd or 0.0
            idle = resumed * WAIT_USD_PER_HOUR / 3600
            return {"scenario": name, "where": second.region, "resumed_s": resumed + restore,
                    "machines_usd": bills, "transfer_usd": transfer, "idle_usd": idle,
                    "total_usd": bills + transfer + idle, "why": (waited or second.placement_reason)[:150]}
        finally:
            await rig.engine.drain()
            rig.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds r1 has no capacity")
    parser.add_argument("--short", type=float, default=2.0, help="seconds of a short outage, like those in the history")
    parser.add_argument("--work", type=float, default=5.0, help="seconds of work left after the loss")
    args = parser.parse_args()
    engine_module.MOVE_SWEEP_SECONDS = 0.5
    rows = [
        (args.outage, await scenario("pinned", "none", args.outage, args.work, 0)),
        (args.outage, await scenario("moves", "object-store", args.outage, args.work, 0)),
        (args.short, await scenario("pinned", "none", args.short, args.work, 0)),
        (args.short, await scenario("moves", "object-store", args.short, args.work, 0)),
        (args.short, await scenario("learned", "object-store", args.short, args.work, 30)),
    ]
    print(f"{args.work:g} s of work left after r1 runs out; idle time at ${WAIT_USD_PER_HOUR:g}/h, "
          f"r1 ${PRICES['r1']:g}/h, r2 ${PRICES['r2']:g}/h; 'learned' saw 30 gaps of 2 s in r1 before")
    print(f"{'outage':>7} {'scenario':<9} {'ran in':<6} {'loss->running':>13} {'machines':>9} {'transfer':>9} "
          f"{'idle':>8} {'total':>8}")
    for outage, r in rows:
        print(f"{outage:>5g} s {r['scenario']:<9} {r['where']:<6} {r['resumed_s']:>11.2f} s {r['machines_usd']:>9.4f} "
              f"{r['transfer_usd']:>9.4f} {r['idle_usd']:>8.4f} {r['total_usd']:>8.4f}")
    rows_only = [r for _, r in rows]
    for r in rows_only[1:2] + rows_only[4:]:
        print(f"  {r['scenario']}: {r['why']}")


if __name__ == "__main__":
    asyncio.run(main())
