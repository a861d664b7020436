"""How long a job is down after RunPod takes its pod: from the preemption (the simulator's
SIGTERM) to the replacement pod running the job again, over many preemptions. RunPod has no spot
since September 2026, so the interruption is the realistic one: the host of an on-demand pod goes
away ("Machine offline", the simulator's default for an on-demand pod; the job's network volume
keeps it on Secure Cloud, where volumes live).

Real processes throughout: the RunPod simulator (`gpuhop sim runpod`) and a `gpuhop serve`
daemon, configured with the tick settings printed in the header. One long job is preempted
again and again; each time the clock runs from the preempt call until the API shows a newer
attempt `running`. Prints median, p90, p99, min and max.

    python bench/preemption_recovery.py [--preemptions 20] [--tick 1.0] [--notice 5] [--start-delay 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from simulators.harness import Daemon, SimProcess, wait_for

REPO = Path(__file__).resolve().parents[1]
KEY = "rpa_BENCH0123456789ABCDEF"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preemptions", type=int, default=20)
    ap.add_argument("--tick", type=float, default=1.0, help="daemon [engine] tick_seconds")
    ap.add_argument("--notice", type=float, default=5.0, help="RunPod's SIGTERM-to-SIGKILL notice (5 s on RunPod)")
    ap.add_argument("--start-delay", type=float, default=1.0, help="simulated container start (image pull)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="gpuhop-bench-"))
    sim = SimProcess("runpod", root / "sim", "--api-key", KEY, "--notice-seconds", str(args.notice),
                     "--start-delay", str(args.start_delay))
    daemon = Daemon(root / "state", f"""
[engine]
tick_seconds = {args.tick}
heartbeat_seconds = 1
launch_grace_seconds = 30
offer_refresh_seconds = 30
[providers.runpod]
api_key = "{KEY}"
api_url = "{sim.url}"
""", log_level="WARNING")
    samples: list[float] = []
    try:
        c = daemon.start()
        job = c.submit({
            "name": "bench", "command": ["python3", str(REPO / "examples" / "train.py"), "--steps", "100000",
                                         "--step-seconds", "0.1"],
            "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
            "placement": {"providers": ["runpod"], "capacity": "on-demand"},
            "volume": {"name": "bench-ckpt", "size_gb": 10},
            "policy": {"max_relaunches": args.preemptions + 5, "checkpoint_interval": 1},
        })
        print(f"# daemon: tick_seconds={args.tick}, woken early by agent reports; RunPod simulator: notice "
              f"{args.notice} s, container start {args.start_delay} s; {args.preemptions} preemptions", flush=True)

        def running_attempt() -> dict | None:
            j = c.job(job["id"])
            last = j["attempts"][-1] if j["attempts"] else None
            return last if j["status"] == "running" and last and last["status"] == "running" else None

        for i in range(args.preemptions):
            current = wait_for(running_attempt, 120, interval=0.05, what="job running")
            time.sleep(0.5)  # let it make some progress
            t0 = time.monotonic()
            sim.admin("POST", f"/_sim/pods/{current['instance_id']}/preempt", {"cause": "host"})
            wait_for(lambda n=current["number"]: (a := running_attempt()) is not None and a["number"] > n,
                     120, interval=0.02, what="replacement running")
            samples.append(time.monotonic() - t0)
            print(f"preemption {i + 1:3d}: back running after {samples[-1]:.2f} s", flush=True)
        c.cancel(job["id"])
        daemon.wait_status(job["id"], {"cancelled"}, 60)
    finally:
        daemon.stop()
        sim.stop()
    print(f"\npreemption -> replacement running, n={len(samples)}: median {statistics.median(samples):.2f} s, "
          f"p90 {percentile(samples, 0.9):.2f} s, p99 {percentile(samples, 0.99):.2f} s, "
          f"min {min(samples):.2f} s, max {max(samples):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
