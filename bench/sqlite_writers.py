"""Two writers of one SQLite database in one daemon (issue 9): the engine's notes (apply_many of
50 jobs, back to back) and the API's group-committed submits (15 jobs a batch, every 5 ms).
Prints how long each submit batch took. SQLite lets one writer in at a time; a writer that
finds the lock taken sleeps in SQLite's busy handler (1, 2, 5, 10 ms and up) and is not woken
when the lock is freed, so a steady writer starves the other. The store queues this process's
writers on a lock of its own instead (orchestrator/store/db.py); run with --sqlite-busy-handler
to see the difference.

    python bench/sqlite_writers.py [--batches 300] [--sqlite-busy-handler]

A benchmark, not a test: it prints figures and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestrator.models import JobSpec  # noqa: E402
from orchestrator.store import Store  # noqa: E402
from orchestrator.store.repo import NewJob  # noqa: E402

SPEC = JobSpec.model_validate({"name": "bench", "command": ["python3", "-c", "pass"], "resources": {"gpu": ["H100"]}})


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--sqlite-busy-handler", action="store_true",
                    help="leave the queueing to SQLite (the store's own lock not taken)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuhop-writers-") as tmp:
        store = Store(f"sqlite:///{tmp}/gpuhop.db")
        store.migrate()
        if args.sqlite_busy_handler:  # a second engine on the same file: its own lock, so SQLite's decides
            engine_side = Store(f"sqlite:///{tmp}/gpuhop.db")
        else:
            engine_side = store
        store.create_jobs([NewJob(f"base{i}", SPEC, False) for i in range(500)])
        stop = threading.Event()

        def engine_writer() -> None:
            i = 0
            while not stop.is_set():
                ids = [f"base{(i * 50 + k) % 500}" for k in range(50)]
                engine_side.apply_many([(j, {"message": f"m{i}", "next_try_at": time.time()}, {},
                                         [(None, "no_capacity", f"x{i}")]) for j in ids])
                i += 1

        took: list[float] = []
        thread = threading.Thread(target=engine_writer)
        thread.start()
        try:
            for b in range(args.batches):
                jobs = [NewJob(f"j{b}-{k}", SPEC, False) for k in range(15)]
                t0 = time.perf_counter()
                store.create_jobs(jobs)
                took.append(time.perf_counter() - t0)
                time.sleep(0.005)
        finally:
            stop.set()
            thread.join()
        took.sort()
        how = "SQLite's busy handler" if args.sqlite_busy_handler else "the store's writer lock"
        print(f"a batch of 15 submits beside a steady engine writer ({how}): p50 {statistics.median(took) * 1000:.1f} ms, "
              f"p90 {took[int(len(took) * 0.9)] * 1000:.1f} ms, p99 {took[int(len(took) * 0.99)] * 1000:.1f} ms, "
              f"max {took[-1] * 1000:.1f} ms")
        if engine_side is not store:
            engine_side.close()
        store.close()


if __name__ == "__main__":
    main()
