"""What AWS's 2-minute spot warning buys: the time a job is not running after a reclaim, with
gpuhop acting on the warning (replacement launched at once, job told to checkpoint, volume moved
as soon as the old instance lets go) against the same scenario with notices ignored (the reclaim
is noticed only when a listing shows it).

Real processes: the AWS simulator (`gpuhop sim aws`, moto underneath) and a `gpuhop serve`
daemon. One job with an EBS volume is interrupted again and again. For each reclaim it records
  * reclaim -> running: from the moment AWS takes the instance (warning + notice) until the
    API shows a newer attempt running (negative = the job was back before the reclaim);
  * downtime: from the old attempt's last checkpointed step to the new attempt's first step,
    read from the volume (the time the job made no progress).

    python bench/aws_interruption.py [--interruptions 5] [--notice 20] [--boot 8] [--tick 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from simulators.harness import Daemon, SimProcess, wait_for

REPO = Path(__file__).resolve().parents[1]


class StepClock:
    """Polls the volume's steps.log and remembers when each step first appeared."""

    def __init__(self, path_of: Callable[[], Path | None]) -> None:
        self.path_of = path_of
        self.seen: dict[int, tuple[float, str]] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            path = self.path_of()
            if path is None or not path.exists():
                continue
            now = time.monotonic()
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    self.seen.setdefault(int(parts[0]), (now, parts[1]))


def run(notices: bool, args: argparse.Namespace, root: Path) -> tuple[list[float], list[float]]:
    sim = SimProcess("aws", root / "sim", "--notice-seconds", str(args.notice), "--boot-delay", str(args.boot))
    sim.admin("POST", "/_sim/policy", {"require_imdsv2": True})  # IMDSv2 only, as organisations require
    daemon = Daemon(root / "state", f"""
[engine]
tick_seconds = {args.tick}
heartbeat_seconds = 1
launch_grace_seconds = 60
offer_refresh_seconds = 30
[providers.aws]
regions = ["us-east-1"]
endpoint_url = "{sim.url}"
access_key_id = "bench"
secret_access_key = "bench"
interruption_notices = {"true" if notices else "false"}
""", log_level="WARNING")
    reclaim_to_running: list[float] = []
    downtime: list[float] = []
    try:
        c = daemon.start()
        job = c.submit({
            "name": "bench", "command": ["python3", str(REPO / "examples" / "train.py"), "--steps", "1000000",
                                         "--step-seconds", "0.1"],
            "resources": {"gpu": ["A10G"], "gpu_count": 1}, "placement": {"capacity": "spot", "providers": ["aws"]},
            "volume": {"name": "bench-ckpt", "size_gb": 10},
            "policy": {"max_relaunches": args.interruptions + 5, "checkpoint_interval": 1},
        })

        def volume_log() -> Path | None:
            vol = c.job(job["id"]).get("volume") or {}
            return sim.state_dir / "volumes" / vol["volume_id"] / "steps.log" if vol.get("volume_id") else None

        log_path: list[Path | None] = [None]
        clock = StepClock(lambda: log_path[0])

        def running() -> dict | None:
            j = c.job(job["id"])
            last = j["attempts"][-1] if j["attempts"] else None
            return last if j["status"] == "running" and last and last["status"] == "running" else None

        for i in range(args.interruptions):
            current = wait_for(running, 300, interval=0.05, what="job running")
            log_path[0] = log_path[0] or volume_log()
            wait_for(lambda n=current["number"]: any(a == f"attempt={n}" for _, a in clock.seen.values()), 120,
                     what="the attempt's first step")
            time.sleep(1.0)
            t_warn = time.monotonic()
            sim.admin("POST", f"/_sim/instances/{current['instance_id']}/interrupt")
            t_reclaim = t_warn + args.notice
            wait_for(lambda n=current["number"]: (a := running()) is not None and a["number"] > n, 600,
                     interval=0.05, what="replacement running")
            reclaim_to_running.append(time.monotonic() - t_reclaim)
            new = f"attempt={current['number'] + 1}"
            wait_for(lambda new=new: any(a == new for _, a in clock.seen.values()), 120, what="first new step")
            old_last = max(t for t, a in clock.seen.values() if a == f"attempt={current['number']}")
            new_first = min(t for t, a in clock.seen.values() if a == new)
            downtime.append(new_first - old_last)
            print(f"  {'notices' if notices else 'polling'} #{i + 1}: reclaim->running {reclaim_to_running[-1]:+.1f} s, "
                  f"downtime {downtime[-1]:.1f} s", flush=True)
            old_id = current["instance_id"]
            wait_for(lambda old_id=old_id: all(x["state"] == "terminated" or x["instance_id"] != old_id
                                               for x in sim.admin("GET", "/_sim/instances")["instances"]), 300,
                     what="old instance reclaimed")
        clock.stop.set()
        c.cancel(job["id"])
        daemon.wait_status(job["id"], {"cancelled"}, 120)
    finally:
        daemon.stop()
        sim.stop()
    return reclaim_to_running, downtime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interruptions", type=int, default=5)
    ap.add_argument("--notice", type=float, default=20.0, help="warning period (120 s on AWS; scaled down)")
    ap.add_argument("--boot", type=float, default=8.0, help="pending -> running of a new instance")
    ap.add_argument("--tick", type=float, default=1.0, help="daemon [engine] tick_seconds")
    args = ap.parse_args()
    print(f"# AWS simulator: notice {args.notice} s, instance boot {args.boot} s; daemon tick {args.tick} s; "
          f"{args.interruptions} interruptions per mode", flush=True)
    results = {}
    for notices in (True, False):
        root = Path(tempfile.mkdtemp(prefix="gpuhop-bench-aws-"))
        results[notices] = run(notices, args, root)
    for notices in (True, False):
        r2r, down = results[notices]
        print(f"{'with notices ' if notices else 'polling only '}: reclaim->running median {statistics.median(r2r):+.1f} s "
              f"(min {min(r2r):+.1f}, max {max(r2r):+.1f}); downtime median {statistics.median(down):.1f} s "
              f"(min {min(down):.1f}, max {max(down):.1f})")
    ratio = statistics.median(results[False][1]) / max(1e-9, statistics.median(results[True][1]))
    print(f"downtime ratio, polling only / with notices: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
