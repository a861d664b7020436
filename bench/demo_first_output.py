"""How soon `gpuhop demo` says something (issue 12.7, item 1): runs `python -m orchestrator.cli
demo` `--runs` times on a pipe, times the first byte it writes to stdout and then, the first line
once read, stops it with Ctrl-C (SIGINT: the demo stops what it had started and removes its state).
Prints each time, the median beside the goal (1 s), and the time to the first line of progress
after it (the simulated RunPod up), for scale.

    python bench/demo_first_output.py [--runs 5]

A benchmark, not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.0


def _read_line(proc: subprocess.Popen[bytes], started: float, timeout: float) -> tuple[float, float, bytes]:
    """(seconds to the first byte, seconds to the end of the first line, the line)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    first = 0.0
    line = b""
    while not line.endswith(b"\n"):
        left = started + timeout - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no line within {timeout:.0f} s")
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError(f"the demo ended (exit {proc.wait()}) before its first line")
        if not line:
            first = time.monotonic() - started
        line += chunk
    return first, time.monotonic() - started, line


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a user would; the whole process group if it does not end within 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def one_run(tmp: Path) -> tuple[float, float, float]:
    """(first byte, first line, the line after the two-line greeting) in seconds from the start."""
    env = {**os.environ, "TMPDIR": str(tmp), "COLUMNS": "80"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "demo"], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        first_byte, first_line, _ = _read_line(proc, started, 30)
        _read_line(proc, started, 30)  # the greeting's second line
        _, progress, _ = _read_line(proc, started, 60)  # the first step of the start, done
        return first_byte, first_line, progress
    finally:
        _stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gpuhop-bench-demo-"))
    try:
        firsts, lines, steps = [], [], []
        for i in range(args.runs):
            first_byte, first_line, progress = one_run(tmp)
            firsts.append(first_byte)
            lines.append(first_line)
            steps.append(progress)
            print(f"  run {i + 1}: first byte {first_byte:.3f} s, first line {first_line:.3f} s, "
                  f"first progress line {progress:.3f} s", flush=True)
        left = sorted(p.name for p in tmp.iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    median = statistics.median(firsts)
    print(f"gpuhop demo: time to the first output byte, median of {args.runs}: {median:.3f} s "
          f"(goal <= {GOAL:.0f} s: {'met' if median <= GOAL else 'NOT met'}); "
          f"first progress line {statistics.median(steps):.3f} s")
    if left:
        print(f"  note: the interrupted demos left {left} in their TMPDIR")


if __name__ == "__main__":
    main()
