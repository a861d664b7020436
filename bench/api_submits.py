"""The REST API under load (issue 9, goal 4): a real `gpuhop serve` process, `--clients`
concurrent aiohttp clients submitting `--submits` jobs as fast as they are answered, then
`GET /v1/jobs` (one page, the default 200) with all of them stored. Prints submits per second
(closed loop: as fast as answered), the latency of submits paced at `--rate` (open loop, 1,000/s
by default: the goal's latency is the one at that rate) and the list's, beside the goals
(>= 1,000 submits/s at p99 <= 50 ms; the list p99 <= 50 ms at 10,000 jobs).

The daemon's engine runs as in production (tick 1 s) on a local provider without GPUs, so the
GPU jobs submitted (with ?force=true, since nothing here could run them) stay queued: the engine still reads and decides every one of them each tick,
and each submit still hints the engine.

    python bench/api_submits.py [--submits 10000] [--clients 50] [--postgres]

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

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from simulators.harness import Daemon  # noqa: E402

SPEC = {"name": "bench", "command": ["python3", "-c", "pass"], "resources": {"gpu": ["H100"]}}


def config(postgres_url: str | None) -> str:
    text = """
[engine]
tick_seconds = 1.0
[providers.local]
cpu_slots = 1
gpu_slots = 0
isolation = "none"
"""
    if postgres_url:
        text = f'[database]\nurl = "{postgres_url}"\n' + text
    return text


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def submits(url: str, token: str, total: int, clients: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    headers = {"Authorization": f"Bearer {token}"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in counter:
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/jobs?force=true", json=SPEC, headers=headers) as resp:
                await resp.read()
                if resp.status != 201:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return total / elapsed, latencies, errors


async def paced(url: str, token: str, rate: float, seconds: float, clients: int) -> tuple[float, list[float], int]:
    """Open loop: submits start at `rate` per second on a fixed schedule whatever the answers,
    spread over `clients` connections, and each latency is counted from its scheduled start (a
    late start counts against the daemon: no coordinated omission). The latency the goal asks
    for is the one at 1,000 submits/s, not at whatever rate saturates the machine."""
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter() + 0.1

        async def one(n: int) -> None:
            nonlocal errors
            due = start + n / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            async with session.post(f"{url}/v1/jobs?force=true", json=SPEC, headers=headers) as resp:
                await resp.read()
                if resp.status != 201:
                    errors += 1
            latencies.append(time.perf_counter() - due)

        await asyncio.gather(*(one(n) for n in range(total)))
        elapsed = time.perf_counter() - start
    return total / elapsed, latencies, errors


async def lists(url: str, token: str, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for _ in range(n):
            t0 = time.perf_counter()
            async with session.get(f"{url}/v1/jobs") as resp:
                await resp.read()
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--submits", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--lists", type=int, default=50)
    ap.add_argument("--rate", type=float, default=1000.0, help="then submits at this rate, open loop (0: skip)")
    ap.add_argument("--seconds", type=float, default=5.0, help="how long the open-loop phase lasts")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL on 127.0.0.1:5432 (database test)")
    args = ap.parse_args()
    pg = None
    if args.postgres:
        import psycopg

        schema = f"bench_api_{int(time.time())}"
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        pg = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    with tempfile.TemporaryDirectory(prefix="gpuhop-api-") as tmp:
        daemon = Daemon(Path(tmp) / "state", config(pg), log_level="WARNING")
        client = daemon.start()
        try:
            rate, lat, errors = asyncio.run(submits(client.url, client.token, args.submits, args.clients))
            print(f"submits: {args.submits:,} from {args.clients} clients: {rate:,.0f}/s (goal >= 1,000), "
                  f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms (goal <= 50); "
                  f"{errors} not 201")
            if args.rate:
                got, lat, errors = asyncio.run(paced(client.url, client.token, args.rate, args.seconds, args.clients))
                print(f"submits at {args.rate:,.0f}/s for {args.seconds:.0f} s (open loop, {args.clients} connections): "
                      f"{got:,.0f}/s, p50 {statistics.median(lat) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms "
                      f"(goal <= 50); {errors} not 201")
            listed = asyncio.run(lists(client.url, client.token, args.lists))
            print(f"GET /v1/jobs with {args.submits:,} jobs stored: p50 {statistics.median(listed) * 1000:.0f} ms, "
                  f"p99 {pct(listed, 0.99) * 1000:.0f} ms (goal <= 50)")
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
