"""The job bench/fault_storm.py runs: counts steps and checkpoints into its volume like
simulators/demo_train.py, but keeps an append-only record the benchmark can audit afterwards.

demo_train.py rewrites its steps.log on resume (it drops steps logged after the checkpoint), which
would hide exactly what the storm looks for. This job never rewrites anything: each step is first
committed to the checkpoint (an atomic rename), then appended to `jobs/<job>/steps.log` as
`<step> <attempt> <pid> <unix time>`. A step number that appears twice was therefore committed
twice (the checkpoint went back, or two machines ran the job at once); a number missing below the
last one was skipped. Every process also appends `begin` and `end` lines to the volume's
`activity.log` (`begin <job> <attempt> <pid> <time> <first step>`, `end <job> <attempt> <pid>
<time> <exit code>`), so the benchmark can tell how many processes wrote to one volume at once.

Several jobs may share one volume (the concurrent-submit scenario), so each keeps its own
directory. Standard library only: it runs wherever the simulators run a machine's command.

    python _storm_job.py --steps N --step-seconds S
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step-seconds", type=float, default=0.3)
    args = parser.parse_args()

    volume = Path(os.environ.get("GPUHOP_VOLUME", "."))
    job = os.environ.get("GPUHOP_JOB_ID", "nojob")
    attempt = os.environ.get("GPUHOP_ATTEMPT", "0")
    pid = os.getpid()
    home = volume / "jobs" / job
    home.mkdir(parents=True, exist_ok=True)
    ckpt = home / "checkpoint.json"
    steps_log = home / "steps.log"
    activity = volume / "activity.log"

    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    append(activity, f"begin {job} {attempt} {pid} {time.time():.3f} {step}\n")
    print(f"attempt {attempt}: starting at step {step} of {args.steps}", flush=True)

    stopping = False

    def on_term(signum: int, frame: object) -> None:  # a notice: finish this step, checkpoint, leave
        nonlocal stopping
        stopping = True
        append(activity, f"term {job} {attempt} {pid} {time.time():.3f} {step}\n")

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    while step < args.steps:
        time.sleep(args.step_seconds)
        step += 1
        tmp = home / f"checkpoint.{pid}.tmp"
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, ckpt)
        append(steps_log, f"{step} {attempt} {pid} {time.time():.3f}\n")
        if stopping:
            code = 143
            break
    append(activity, f"end {job} {attempt} {pid} {time.time():.3f} {code}\n")
    print(f"attempt {attempt}: {'SIGTERM at' if code else 'done,'} step {step}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
