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
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._pg import fresh_schema  # noqa: E402
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU used by the daemon and by this client over a phase, as shares of one core: on two
    cores the client's own share is the machine's, not the daemon's, to spend."""

    def __init__(self, daemon_pid: int) -> None:
        self.pid = daemon_pid
        self.t0, self.d0, self.c0 = time.perf_counter(), cpu_seconds(daemon_pid), time.process_time()

    def __str__(self) -> str:
        wall = time.perf_counter() - self.t0
        daemon = (cpu_seconds(self.pid) - self.d0) / wall
        client = (time.process_time() - self.c0) / wall
        return f"CPU: daemon {daemon:.0%} of a core, this client {client:.0%}"


def histograms(url: str, token: str) -> dict[str, list[tuple[float, float]]]:
    """The daemon's own latency histograms from /metrics: the submit route's handling time and
    the event loop's lag, each as cumulative (upper bound, count) buckets."""
    import urllib.request

    wanted = {'gpuhop_api_request_seconds_bucket{le="%s",method="POST",route="/v1/jobs"}': "submit",
              'gpuhop_api_request_seconds_bucket{le="%s",method="GET",route="/v1/jobs"}': "list",
              'gpuhop_event_loop_lag_seconds_bucket{le="%s"}': "loop lag"}
    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    out: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if "_bucket{" not in name:
            continue
        le = name.split('le="', 1)[1].split('"', 1)[0]
        key = wanted.get(name.replace(f'le="{le}"', 'le="%s"'))
        if key is not None:
            out.setdefault(key, []).append((float(le), float(value)))
    return out


class Server:
    """What the daemon itself saw over a phase: p99 of its handling time and of its loop's lag
    (bucket upper bounds), so a slow answer can be told apart from a busy loop."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.before = histograms(url, token)

    def __str__(self) -> str:
        after = histograms(self.url, self.token)
        parts = []
        for key, buckets in after.items():
            old = dict(self.before.get(key, []))
            delta = [(le, n - old.get(le, 0.0)) for le, n in buckets]
            total = delta[-1][1] if delta else 0
            if not total:
                continue
            p99 = next(le for le, n in delta if n >= 0.99 * total)
            parts.append(f"{key} p99 <= {p99 * 1000:g} ms" if p99 != float("inf") else f"{key} p99 > 10 s")
        return "daemon: " + ", ".join(parts)


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
    pg = fresh_schema("bench_api") if args.postgres else None
    with tempfile.TemporaryDirectory(prefix="gpuhop-api-") as tmp:
        daemon = Daemon(Path(tmp) / "state", config(pg), log_level="WARNING")
        client = daemon.start()
        try:
            pid = daemon.proc.pid
            cpu, server = Cpu(pid), Server(client.url, client.token)
            rate, lat, errors = asyncio.run(submits(client.url, client.token, args.submits, args.clients))
            print(f"submits: {args.submits:,} from {args.clients} clients: {rate:,.0f}/s (goal >= 1,000), "
                  f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms (goal <= 50); "
                  f"{errors} not 201; {cpu}; {server}")
            if args.rate:
                cpu, server = Cpu(pid), Server(client.url, client.token)
                got, lat, errors = asyncio.run(paced(client.url, client.token, args.rate, args.seconds, args.clients))
                print(f"submits at {args.rate:,.0f}/s for {args.seconds:.0f} s (open loop, {args.clients} connections): "
                      f"{got:,.0f}/s, p50 {statistics.median(lat) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms "
                      f"(goal <= 50); {errors} not 201; {cpu}; {server}")
            cpu, server = Cpu(pid), Server(client.url, client.token)
            listed = asyncio.run(lists(client.url, client.token, args.lists))
            print(f"GET /v1/jobs with {args.submits:,} jobs stored: p50 {statistics.median(listed) * 1000:.0f} ms, "
                  f"p99 {pct(listed, 0.99) * 1000:.0f} ms (goal <= 50); {cpu}; {server}")
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
