"""The money path measured under faults (issue 7, "What it must show"): does gpuhop lose jobs,
run a step twice, rent two machines for one attempt, put two jobs on one volume, call a healthy
machine lost, leak machines or volumes, stall its loop, or misstate what a job cost, when the
providers and the daemon misbehave at once?

Real processes only, as bench/preemption_recovery.py and bench/aws_interruption.py: a provider
simulator (`gpuhop sim runpod|aws`, through simulators/harness.py) and a `gpuhop serve` daemon
on a fixed port (a restart keeps its address, as a service's does), driven through the REST API
(orchestrator/client.py) and the simulators' `/_sim/*` admin APIs. The jobs are
bench/_storm_job.py: short CPU jobs that count steps, checkpoint into their volume and keep an
append-only record there that the benchmark audits afterwards (bench/_storm_measure.py defines
every figure). Each scenario gets a fresh simulator, daemon and state directory:

  storm     --jobs jobs, --preemptions preemptions and --kills daemon kill -9s (restarted at once)
  faults20  the same with 20% of provider API calls failing (500, 429/throttling, error, hang)
  faults50  the same at 50%
  latency   every launch path call takes --latency seconds (POST /_sim/latency where the simulator
            has it, else a hang-then-fail fault on a share of calls, said in the table), with
            preemptions
  outage    the daemon stopped for 3 x heartbeat_timeout_seconds while its jobs run, then started
  volume    --volume-submits concurrent submits (threads) naming one volume

Faults last until the storm's kills and preemptions are done, then are cleared and the jobs are
given --drain seconds to finish; whatever is still wrong then is what the table shows. /healthz
and /metrics (the tick counter) are polled all along, except while the daemon is down on purpose.

    python bench/fault_storm.py                 # full size, both providers (tens of minutes)
    python bench/fault_storm.py --quick         # ~3 minutes on 2 cores: 6 jobs, 3 kills, 3 preemptions,
                                                # providers side by side, 2 scenarios at a time each
    python bench/fault_storm.py --provider runpod --scenarios storm,outage --jobs 20 --kills 10

It is a benchmark, not a test: it prints the figures beside their targets and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/fault_storm.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench._storm_measure import Figures, figures, read_volumes  # noqa: E402
from orchestrator.client import Client, ClientError  # noqa: E402
from simulators.harness import Daemon, SimProcess, free_port, wait_for  # noqa: E402

JOB = REPO / "bench" / "_storm_job.py"
RUNPOD_KEY = "rpa_STORM0123456789ABCDEF"
SCENARIOS = ("storm", "faults20", "faults50", "latency", "outage", "volume")
PROVIDERS = ("runpod", "aws")
TERMINAL = {"succeeded", "failed", "cancelled"}
PRINT = threading.Lock()


def say(provider: str, text: str) -> None:
    with PRINT:
        print(f"[{provider:6s} {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------- knobs


@dataclass
class Knobs:
    jobs: int
    kills: int
    preemptions: int
    kill_interval: float
    step_seconds: float
    steps: int  # 0 = long enough to outlast the storm's kills
    heartbeat_timeout: float
    volume_submits: int
    latency: float
    drain: float
    notice: float
    seed: int

    def storm_steps(self) -> int:
        if self.steps:
            return self.steps
        phase = max(self.kills * (self.kill_interval + 2.0), 8.0)
        return math.ceil(phase / self.step_seconds) + 10


# --------------------------------------------------------------------------- the daemon


class FixedPortDaemon(Daemon):
    """The harness's daemon, but always on one port: agents on the machines were told the
    daemon's URL at launch, and a restarted service keeps its address."""

    def __init__(self, state_dir: Path, config: str) -> None:
        super().__init__(state_dir, config, log_level=os.environ.get("STORM_LOG_LEVEL", "WARNING"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Client:
        server_file = self.state_dir / "server.json"
        if server_file.exists():
            server_file.unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHOP_")}
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "serve", "--config", str(self.config_path),
                 "--state-dir", str(self.state_dir), "--listen", f"127.0.0.1:{self.port}",
                 "--log-level", self.log_level],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(REPO),
            )
        self.proc = proc
        wait_for(lambda: server_file.exists() or proc.poll() is not None, 60, what="daemon start")
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}: {self.log()[-1500:]}")
        self.client = Client(self.url, (self.state_dir / "token").read_text().strip(), timeout=10)
        return self.client


# --------------------------------------------------------------------------- observing the daemon


class Poller:
    """Polls /healthz and the tick counter in /metrics while the daemon is meant to be up."""

    STARTUP = 5.0
    TICK_RE = re.compile(r"^gpuhop_tick_seconds_count(?:\{[^}]*\})?\s+([0-9.eE+]+)", re.M)

    def __init__(self, daemon: FixedPortDaemon, interval: float = 0.25) -> None:
        self.daemon = daemon
        self.interval = interval
        self.up = False
        self.polls = 0
        self.status_503 = 0
        self.status_503_startup = 0  # of those, within STARTUP seconds of a (re)start
        self.no_answer = 0
        self._started = 0.0
        self.max_gap = 0.0
        self.tick_seen = False
        self._last_count: float | None = None
        self._last_change = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def daemon_up(self) -> None:
        with self._lock:
            self.up, self._last_count, self._last_change = True, None, time.monotonic()
            self._started = self._last_change

    def daemon_down(self) -> None:
        with self._lock:
            self._close_gap(time.monotonic())
            self.up = False

    def _close_gap(self, now: float) -> None:
        if self.up and self.tick_seen:
            self.max_gap = max(self.max_gap, now - self._last_change)

    def stop(self) -> None:
        self.daemon_down()
        self._stop.set()
        self._thread.join(5)

    def _get(self, path: str, auth: bool) -> tuple[int, str]:
        headers = {}
        if auth:
            client = getattr(self.daemon, "client", None)
            if client is None:
                return 0, ""
            headers["Authorization"] = f"Bearer {client.token}"
        req = urllib.request.Request(self.daemon.url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=3) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except (OSError, ValueError):
            return 0, ""

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.up:
                continue
            status, _ = self._get("/healthz", auth=False)
            mstatus, text = self._get("/metrics", auth=True)
            now = time.monotonic()
            with self._lock:
                if not self.up:
                    continue
                self.polls += 1
                if status == 503:
                    self.status_503 += 1
                    self.status_503_startup += now - self._started <= self.STARTUP
                elif status == 0:
                    self.no_answer += 1
                m = self.TICK_RE.search(text) if mstatus == 200 else None
                if m is not None:
                    count = float(m.group(1))
                    if self._last_count is None or count != self._last_count:
                        if self._last_count is not None or count > 0:
                            self.tick_seen = True
                            self._close_gap(now)
                        self._last_change = now
                        self._last_count = count


# --------------------------------------------------------------------------- providers


class Provider:
    """What differs between RunPod and AWS: the simulator, the config table, the job's
    resources, how a machine is taken away, and how faults and latency are injected."""

    name = ""

    def __init__(self, root: Path, knobs: Knobs) -> None:
        self.root = root
        self.knobs = knobs
        self.sim: SimProcess = self.start_sim()
        self.notes: list[str] = []

    def start_sim(self) -> SimProcess:
        raise NotImplementedError

    def config(self) -> str:
        raise NotImplementedError

    def resources(self) -> dict[str, Any]:
        raise NotImplementedError

    def running_machines(self) -> list[str]:
        raise NotImplementedError

    def take(self, machine_id: str) -> bool:
        raise NotImplementedError

    def faults(self, rate: float) -> None:
        raise NotImplementedError

    def clear_faults(self) -> None:
        raise NotImplementedError

    def latency(self, seconds: float) -> str:
        raise NotImplementedError

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        return self.sim.admin(method, path, body)

    def try_latency_api(self, operations: list[str], seconds: float) -> bool:
        """POST /_sim/latency {"operation", "seconds"} where the simulator has it."""
        try:
            for op in operations:
                answer = self.admin("POST", "/_sim/latency", {"operation": op, "seconds": seconds})
                if not isinstance(answer, dict) or answer.get("ok") is False:
                    return False
        except urllib.error.HTTPError:  # 404/405 from aiohttp, a 500 page from moto's catch-all
            return False
        except ValueError:  # an answer that is not JSON: not this endpoint
            return False
        return True

    @staticmethod
    def split_rate(total: float, kinds: int) -> float:
        """Each of `kinds` independent rules fires at this rate so that one fires at `total`."""
        return 1.0 - (1.0 - total) ** (1.0 / kinds)


class RunPod(Provider):
    name = "runpod"

    def start_sim(self) -> SimProcess:
        sim = SimProcess("runpod", self.root / "sim", "--api-key", RUNPOD_KEY, "--notice-seconds",
                         str(self.knobs.notice), "--start-delay", "0.5")
        sim.admin("POST", "/_sim/capacity", {"count": 500, "gpu_type": "NVIDIA GeForce RTX 4090"})
        return sim

    def config(self) -> str:
        return f'[providers.runpod]\napi_key = "{RUNPOD_KEY}"\napi_url = "{self.sim.url}"\n'

    def resources(self) -> dict[str, Any]:
        return {"resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
                "placement": {"providers": ["runpod"], "capacity": "on-demand"}}

    def running_machines(self) -> list[str]:
        pods = self.admin("GET", "/_sim/pods")["pods"]
        return [p["id"] for p in pods if p["desiredStatus"] == "RUNNING" and p.get("processRunning")
                and str(p.get("name", "")).startswith("gpuhop-")]

    def take(self, machine_id: str) -> bool:
        try:
            self.admin("POST", f"/_sim/pods/{machine_id}/preempt")
            return True
        except urllib.error.HTTPError:
            return False

    def faults(self, rate: float) -> None:
        each = self.split_rate(rate, 4)
        for kind in ("500", "429", "graphql", "timeout"):
            self.admin("POST", "/_sim/faults", {"kind": kind, "rate": each, "seconds": 10})

    def clear_faults(self) -> None:
        self.admin("POST", "/_sim/faults", {"clear": True})

    def latency(self, seconds: float) -> str:
        ops = ["gpuTypes", "podFindAndDeployOnDemand", "podRentInterruptable"]
        if self.try_latency_api(ops, seconds):
            return f"/_sim/latency {seconds:g} s on {', '.join(ops)}"
        self.admin("POST", "/_sim/faults", {"kind": "timeout", "rate": 0.3, "seconds": seconds})
        return (f"no /_sim/latency: fallback, 30% of all GraphQL calls hang {seconds:g} s then 504 "
                "(nothing is created by a hung call)")


class Aws(Provider):
    name = "aws"

    def start_sim(self) -> SimProcess:
        sim = SimProcess("aws", self.root / "sim", "--notice-seconds", str(self.knobs.notice),
                         "--boot-delay", "1")
        zones = [z for z, r in sim.admin("GET", "/_sim/catalog")["zones"].items() if r == "us-east-1"]
        for zone in zones:
            sim.admin("POST", "/_sim/capacity", {"zone": zone, "capacity": 500, "instance_type": "g5.xlarge",
                                                 "market": "spot"})
        return sim

    def config(self) -> str:
        return (f'[providers.aws]\nregions = ["us-east-1"]\nendpoint_url = "{self.sim.url}"\n'
                'access_key_id = "storm"\nsecret_access_key = "storm"\ninstance_types = ["g5.xlarge"]\n')

    def resources(self) -> dict[str, Any]:
        return {"resources": {"gpu": ["A10G"], "gpu_count": 1},
                "placement": {"providers": ["aws"], "capacity": "spot"}}

    def running_machines(self) -> list[str]:
        rows = self.admin("GET", "/_sim/instances")["instances"]
        return [r["instance_id"] for r in rows if r["state"] == "running" and r.get("job_started")
                and not r.get("notice") and r.get("market") == "spot"
                and str(r.get("name", "")).startswith("gpuhop-")]

    def take(self, machine_id: str) -> bool:
        try:
            self.admin("POST", f"/_sim/instances/{machine_id}/interrupt")
            return True
        except urllib.error.HTTPError:
            return False

    def faults(self, rate: float) -> None:
        each = self.split_rate(rate, 4)
        for code in ("RequestLimitExceeded", "InternalError", "Unavailable", "timeout"):
            self.admin("POST", "/_sim/faults", {"code": code, "rate": each, "delay": 10})

    def clear_faults(self) -> None:
        self.admin("DELETE", "/_sim/faults")

    def latency(self, seconds: float) -> str:
        # the AWS simulator's "latency" fault: the call waits, then is carried out as usual,
        # whether or not the client still waits (as EC2 does with a request it accepted)
        self.admin("POST", "/_sim/faults", {"code": "latency", "rate": 1.0, "delay": seconds,
                                            "actions": ["RunInstances", "DescribeSpotPriceHistory"]})
        return f"latency fault: every RunInstances and DescribeSpotPriceHistory takes {seconds:g} s, then succeeds"


PROVIDER_CLASSES: dict[str, Callable[[Path, Knobs], Provider]] = {"runpod": RunPod, "aws": Aws}


# --------------------------------------------------------------------------- one scenario


@dataclass
class Outcome:
    provider: str
    scenario: str
    figures: Figures | None = None
    error: str = ""
    seconds: float = 0.0
    kills: int = 0
    preemptions: int = 0
    start_failures: int = 0
    refused: int = 0
    submit_errors: int = 0
    polls: int = 0
    status_503: int = 0
    status_503_startup: int = 0
    no_answer: int = 0
    tick_gap: float | None = None
    notes: list[str] = field(default_factory=list)


class Run:
    """One scenario on one provider: its own simulator, daemon and state directory."""

    def __init__(self, provider: str, scenario: str, knobs: Knobs, root: Path) -> None:
        self.scenario = scenario
        self.knobs = knobs
        self.root = root
        self.rng = random.Random(f"{knobs.seed}-{provider}-{scenario}")
        self.out = Outcome(provider, scenario)
        root.mkdir(parents=True, exist_ok=True)
        self.p = PROVIDER_CLASSES[provider](root, knobs)
        self.daemon = FixedPortDaemon(root / "state", self.config())
        self.poller = Poller(self.daemon)
        self.jobs: list[str] = []
        self.targets: dict[str, int] = {}
        self.taken: set[str] = set()
        self.outage: tuple[float, float] | None = None  # wall clock, the daemon down on purpose

    def config(self) -> str:
        return f"""
[engine]
tick_seconds = 1
heartbeat_seconds = 1
heartbeat_timeout_seconds = {self.knobs.heartbeat_timeout:g}
launch_grace_seconds = 20
offer_refresh_seconds = 5
retry_backoff_max_seconds = 2
{self.p.config()}"""

    def log(self, text: str) -> None:
        say(self.p.name, f"{self.scenario}: {text}")

    # -- daemon control

    def start(self) -> Client:
        for tries in range(3):
            try:
                client = self.daemon.start()
                self.poller.daemon_up()
                return client
            except (RuntimeError, AssertionError) as exc:
                self.out.start_failures += 1
                self.out.notes.append(f"daemon start failed: {str(exc)[-300:]}")
                with contextlib.suppress(Exception):
                    if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                        self.daemon.kill9()
                if tries == 2:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def kill_and_restart(self) -> None:
        self.poller.daemon_down()
        self.daemon.kill9()
        self.out.kills += 1
        self.start()

    @property
    def client(self) -> Client:
        return self.daemon.client

    # -- jobs

    def spec(self, i: int, steps: int, volume: str) -> dict[str, Any]:
        return {
            "name": f"storm-{i}",
            "command": ["python3", str(JOB), "--steps", str(steps), "--step-seconds", f"{self.knobs.step_seconds:g}"],
            **self.p.resources(),
            "volume": {"name": volume, "size_gb": 10, "mount_path": "/workspace"},
            "policy": {"max_relaunches": 200, "checkpoint_interval": 1},
        }

    def submit(self, spec: dict[str, Any]) -> None:
        for _ in range(5):
            try:
                job = self.client.submit(spec)
            except ClientError as exc:
                if exc.status == 409:
                    self.out.refused += 1
                    return
                if exc.status and exc.status < 500:
                    self.out.submit_errors += 1
                    self.out.notes.append(f"submit refused: {exc}")
                    return
                time.sleep(0.5)
                continue
            self.jobs.append(job["id"])
            self.targets[job["id"]] = int(spec["command"][3])
            return
        self.out.submit_errors += 1

    def jobs_view(self) -> list[dict[str, Any]]:
        out = []
        for job_id in self.jobs:
            for _ in range(3):
                try:
                    out.append(self.client.job(job_id))
                    break
                except ClientError as exc:
                    if exc.status == 404:
                        out.append({"id": job_id, "missing": True})
                        break
                    time.sleep(1)
            else:
                out.append({"id": job_id, "status": "unknown (API did not answer)", "attempts": []})
        return out

    def statuses(self) -> dict[str, str]:
        try:
            return {j["id"]: j["status"] for j in self.client.jobs() if j["id"] in set(self.jobs)}
        except ClientError:
            return {}

    def preempt_one(self) -> bool:
        try:
            machines = [m for m in self.p.running_machines() if m not in self.taken]
        except (OSError, ValueError):
            return False
        self.rng.shuffle(machines)
        for m in machines[:3]:
            if self.p.take(m):
                self.taken.add(m)
                self.out.preemptions += 1
                return True
        return False

    # -- phases

    def storm(self, kills: int, preemptions: int, phase: float) -> None:
        """Kill the daemon every kill_interval and take a machine away every phase/preemptions,
        until both counts are done (or three times the planned phase has passed)."""
        t0 = time.monotonic()
        next_kill = t0 + self.knobs.kill_interval
        gap = phase / max(1, preemptions)
        next_take = t0 + min(gap, 2.0)
        give_up = t0 + 2 * phase + 15
        while (self.out.kills < kills or self.out.preemptions < preemptions) and time.monotonic() < give_up:
            now = time.monotonic()
            if self.out.preemptions < preemptions and now >= next_take:
                next_take = now + (gap if self.preempt_one() else 0.5)
            if self.out.kills < kills and now >= next_kill:
                self.kill_and_restart()
                next_kill = time.monotonic() + self.knobs.kill_interval
            time.sleep(0.05)
        if self.out.kills < kills or self.out.preemptions < preemptions:
            self.out.notes.append(f"storm cut short: {self.out.kills}/{kills} kills, "
                                  f"{self.out.preemptions}/{preemptions} preemptions (no running machine to take)")

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.statuses()
            if st and len(st) == len(self.jobs) and all(s in TERMINAL for s in st.values()):
                return
            time.sleep(1)

    def settle_machines(self, timeout: float) -> None:
        """Give the daemon a moment to stop the machines of ended jobs before leaks are counted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                jobs = self.client.jobs()
                live = {a.get("instance_id") for j in jobs if j["status"] not in TERMINAL
                        for a in j.get("attempts", [])}
                ledger = self.p.admin("GET", "/_sim/ledger")
            except (ClientError, OSError):
                time.sleep(1)
                continue
            billing = [e for e in ledger["entries"] if e["kind"] in ("pod", "instance") and e["running"]
                       and e["id"] not in live]
            if not billing:
                return
            time.sleep(1)

    def settle_bills(self, timeout: float) -> None:
        """Give the daemon a moment to read the final bills of stopped machines (a stop's answer
        carries it; with 10 s provider calls it comes well after the job ended): costs are
        compared with the ledger once final, and those still estimates are named."""
        deadline = time.monotonic() + timeout
        waiting: list[str] = []
        while time.monotonic() < deadline:
            try:
                jobs = self.client.jobs()
            except (ClientError, OSError):
                time.sleep(1)
                continue
            waiting = [a["name"] for j in jobs if j["status"] in TERMINAL for a in j.get("attempts", [])
                       if a.get("cost_final") is False]
            if not waiting:
                return
            time.sleep(1)
        self.out.notes.append(f"{len(waiting)} attempt cost(s) still estimates {timeout:.0f} s after the end: "
                              + ", ".join(waiting[:5]))

    def wait_running(self, timeout: float) -> None:
        def check() -> bool:
            try:
                jobs = {j["id"]: j for j in self.client.jobs()}
            except ClientError:
                return False
            return all(jobs.get(i, {}).get("status") in ("running", *TERMINAL) for i in self.jobs)

        with contextlib.suppress(AssertionError):
            wait_for(check, timeout, interval=0.5, what="jobs running")

    # -- scenarios

    def run(self) -> Outcome:
        t0 = time.monotonic()
        k = self.knobs
        long_work = 0.0
        try:
            self.start()
            if self.scenario in ("storm", "faults20", "faults50"):
                steps = k.storm_steps()
                for i in range(k.jobs):
                    self.submit(self.spec(i, steps, f"storm-{i}"))
                rate = {"storm": 0.0, "faults20": 0.2, "faults50": 0.5}[self.scenario]
                if rate:
                    self.p.faults(rate)
                self.log(f"{len(self.jobs)} jobs x {steps} steps; {k.kills} kills, {k.preemptions} preemptions"
                         + (f", {rate:.0%} API faults" if rate else ""))
                self.storm(k.kills, k.preemptions, max(k.kills * (k.kill_interval + 2.0), 8.0))
                if rate:
                    self.p.clear_faults()
            elif self.scenario == "latency":
                note = self.p.latency(k.latency)
                self.out.notes.insert(0, note)
                steps = k.steps or math.ceil(15 / k.step_seconds)
                for i in range(k.jobs):
                    self.submit(self.spec(i, steps, f"storm-{i}"))
                self.log(f"{len(self.jobs)} jobs x {steps} steps, {k.preemptions} preemptions; {note}")
                self.storm(0, k.preemptions, max(steps * k.step_seconds / 2, 10.0))
            elif self.scenario == "outage":
                outage = 3 * k.heartbeat_timeout
                short_work = outage + 5.0
                short = math.ceil(short_work / k.step_seconds)
                long_work = short_work + outage / 2 + 10
                long = math.ceil(long_work / k.step_seconds)
                for i in range(k.jobs):
                    self.submit(self.spec(i, short if i % 2 else long, f"storm-{i}"))
                self.log(f"{len(self.jobs)} jobs (half timed to finish during the outage); outage {outage:g} s")
                self.wait_running(90)
                # stop when the short jobs have about 0.6 x outage of work left, so they end inside it
                shorts = {j for j, n in self.targets.items() if n == short}
                begins = [r.begin for v in read_volumes(self.p.sim.state_dir / "volumes") for r in v.runners
                          if r.job in shorts]
                if begins:
                    time.sleep(max(0.0, min(max(begins) + short_work - 0.6 * outage - time.time(), outage)))
                self.poller.daemon_down()
                down = time.time()
                try:
                    self.daemon.stop()
                except AssertionError as exc:  # it was killed after 30 s; say so and go on
                    self.out.notes.append(str(exc))
                gone = time.time()  # it serves (and hears from agents) until its process has exited
                if gone - down > 2:
                    self.out.notes.append(f"the daemon took {gone - down:.1f} s to stop on SIGTERM")
                time.sleep(outage)
                self.outage = (gone, time.time())
                self.start()
            elif self.scenario == "volume":
                steps = k.steps or 8
                barrier = threading.Barrier(k.volume_submits)

                def one(i: int) -> None:
                    with contextlib.suppress(threading.BrokenBarrierError):
                        barrier.wait(10)
                    self.submit(self.spec(i, steps, "shared-volume"))

                threads = [threading.Thread(target=one, args=(i,)) for i in range(k.volume_submits)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                self.log(f"{k.volume_submits} concurrent submits naming one volume: {len(self.jobs)} accepted, "
                         f"{self.out.refused} refused (409)")
            self.drain(k.drain + (long_work if self.scenario == "outage" else 0.0))
            self.settle_machines(15)
            self.settle_bills(30)
            self.collect()
        except Exception as exc:  # a benchmark reports what broke instead of dying
            self.out.error = f"{type(exc).__name__}: {str(exc)[-400:]}"
            self.log(f"aborted: {self.out.error}")
            with contextlib.suppress(Exception):
                self.collect()
        finally:
            self.poller.stop()
            with contextlib.suppress(Exception):  # measured already: no need to wait on a clean stop
                if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                    self.daemon.kill9()
            with contextlib.suppress(Exception):
                self.p.sim.stop()
        self.out.seconds = time.monotonic() - t0
        self.out.polls, self.out.status_503, self.out.no_answer = (
            self.poller.polls, self.poller.status_503, self.poller.no_answer)
        self.out.status_503_startup = self.poller.status_503_startup
        self.out.tick_gap = self.poller.max_gap if self.poller.tick_seen else None
        self.out.notes.extend(self.p.notes)
        return self.out

    def collect(self) -> None:
        self.poller.daemon_down()  # the gap ends here: what follows is the benchmark's own reading
        jobs = self.jobs_view()
        ledger = self.p.admin("GET", "/_sim/ledger")
        volumes = read_volumes(self.p.sim.state_dir / "volumes")
        with contextlib.suppress(OSError, TypeError, ValueError):  # the raw material, for a second look
            (self.root / "collected.json").write_text(json.dumps(
                {"jobs": jobs, "ledger": ledger, "taken": sorted(self.taken)}, indent=1, default=str))
        self.out.figures = figures(jobs, self.out.refused, self.targets, volumes, ledger, self.taken)
        if self.outage is not None:
            down, up = self.outage
            runners = [r for v in volumes for r in v.runners]
            done = {r.job for r in runners if r.exit_code == 0 and down <= r.end <= up}
            alive = {r.job for r in runners if r.begin < down and r.end > up}
            self.out.notes.append(f"during the outage: {len(done)} job(s) finished, {len(alive)} kept running "
                                  "through it (per their volumes)")
        f = self.out.figures
        self.log(f"done: {f.jobs} jobs, {f.lost} lost, {f.stuck} stuck; {self.out.kills} kills, "
                 f"{self.out.preemptions} preemptions")


# --------------------------------------------------------------------------- the table


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("  ok" if ok else "  MISS")


def rows_of(o: Outcome) -> list[tuple[str, str, bool | None]]:
    """(figure, text, meets its target) for one outcome, in the table's row order."""
    if o.figures is None:
        return [("error", o.error or "no figures", False)]
    f = o.figures
    share = (o.status_503 / o.polls) if o.polls else None
    cost = ("n/a" if f.cost_error is None else "inf" if f.cost_error == float("inf") else f"{f.cost_error:.2%}")
    gap = "n/a" if o.tick_gap is None else f"{o.tick_gap:.1f} s"
    return [
        ("jobs accepted / refused", f"{f.jobs} / {o.refused}", None),
        ("jobs lost / stuck", f"{f.lost} / {f.stuck}", f.lost == 0 and f.stuck == 0),
        ("steps run twice / skipped", f"{f.steps_twice} / {f.steps_skipped}", f.steps_twice == 0 and f.steps_skipped == 0),
        ("machines per attempt name (max)", str(f.machines_per_name), f.machines_per_name <= 1),
        ("jobs on one volume at once (max)", str(f.writers_per_volume), f.writers_per_volume <= 1),
        ("healthy/finished attempts relaunched", str(f.relaunched_healthy), f.relaunched_healthy == 0),
        ("  finished under a notice (by rule)", str(f.finished_under_notice), None),
        ("leaked machines / volumes", f"{f.leaked_machines} / {f.leaked_volumes}",
         f.leaked_machines == 0 and f.leaked_volumes == 0),
        ("longest tick gap", gap, None if o.tick_gap is None else o.tick_gap <= 3.0),
        ("/healthz 503s of polls", "n/a" if share is None else f"{share:.1%} of {o.polls}",
         None if share is None else o.status_503 - o.status_503_startup == 0),
        ("  503s <= 5 s after a start; no answer", f"{o.status_503_startup}; {o.no_answer}", o.no_answer == 0),
        ("max per-job cost error vs ledger", cost, None if f.cost_error is None else f.cost_error <= 0.01),
        ("kills / preemptions done", f"{o.kills} / {o.preemptions}", None),
    ]


TARGETS = {
    "jobs lost / stuck": "0 / 0",
    "steps run twice / skipped": "0 / 0",
    "machines per attempt name (max)": "1",
    "jobs on one volume at once (max)": "1",
    "healthy/finished attempts relaunched": "0",
    "leaked machines / volumes": "0 / 0",
    "longest tick gap": "<= 3 s (tick 1 s)",
    "/healthz 503s of polls": "0 past start-up",
    "  503s <= 5 s after a start; no answer": "-; 0",
    "max per-job cost error vs ledger": "<= 1%",
}


def print_tables(outcomes: list[Outcome], providers: list[str], scenarios: list[str], details: int) -> None:
    by = {(o.provider, o.scenario): o for o in outcomes}
    for sc in scenarios:
        cols = [by.get((p, sc)) for p in providers]
        print(f"\n== {sc} " + "=" * (96 - len(sc)))
        header = f"{'figure':38s} {'target':18s} " + " ".join(f"{p:>22s}" for p in providers)
        print(header)
        print("-" * len(header))
        names: list[str] = []
        for o in cols:
            for name, _, _ in rows_of(o) if o else []:
                if name not in names:
                    names.append(name)
        for name in names:
            cells = []
            for o in cols:
                row = next((r for r in rows_of(o) if r[0] == name), None) if o else None
                cells.append(f"{(row[1] + _mark(row[2])) if row else '-':>22s}")
            print(f"{name:38s} {TARGETS.get(name, ''):18s} " + " ".join(cells))
        for o in cols:
            if o is None:
                continue
            extra = list(o.notes)
            if o.error:
                extra.insert(0, f"aborted: {o.error}")
            if o.figures is not None:
                if o.figures.cost_error_job:
                    extra.append(f"worst cost: job {o.figures.cost_error_job}")
                extra += o.figures.details[:details]
                if len(o.figures.details) > details:
                    extra.append(f"... {len(o.figures.details) - details} more")
            print(f"  {o.provider} ({o.seconds:.0f} s):" + ("" if extra else " nothing to add"))
            for line in extra:
                print(f"    - {line}")


# --------------------------------------------------------------------------- main


def run_one(provider: str, sc: str, knobs: Knobs, root: Path, out: list[Outcome]) -> None:
    say(provider, f"{sc}: starting")
    try:
        out.append(Run(provider, sc, knobs, root / f"{provider}-{sc}").run())
    except Exception as exc:  # the simulator did not start, say
        out.append(Outcome(provider, sc, error=f"{type(exc).__name__}: {str(exc)[-400:]}"))
        say(provider, f"{sc}: could not run: {exc}")


def run_provider(provider: str, scenarios: list[str], knobs: Knobs, root: Path, out: list[Outcome],
                 at_once: int) -> None:
    """The scenarios of one provider, `at_once` of them side by side (each has its own processes)."""
    todo = list(scenarios)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                sc = todo.pop(0)
            run_one(provider, sc, knobs, root, out)

    threads = [threading.Thread(target=worker) for _ in range(max(1, at_once))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, providers side by side (~2-3 min)")
    ap.add_argument("--provider", default="runpod,aws", help="runpod, aws or both (comma-separated)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"any of {', '.join(SCENARIOS)}")
    ap.add_argument("--jobs", type=int, help="jobs per scenario (default 50; quick 6)")
    ap.add_argument("--kills", type=int, help="daemon kill -9s per storm (default 30; quick 3)")
    ap.add_argument("--preemptions", type=int, help="machines taken away per storm (default = jobs; quick 3)")
    ap.add_argument("--kill-interval", type=float, help="seconds between kills (default 3; quick 2)")
    ap.add_argument("--steps", type=int, default=0, help="steps per job (default: outlast the storm)")
    ap.add_argument("--step-seconds", type=float, help="seconds per step (default 0.5; quick 0.3)")
    ap.add_argument("--heartbeat-timeout", type=float, help="daemon heartbeat_timeout_seconds (default 8; quick 4)")
    ap.add_argument("--volume-submits", type=int, default=20, help="concurrent submits naming one volume")
    ap.add_argument("--latency", type=float, default=10.0, help="provider latency in the latency scenario")
    ap.add_argument("--drain", type=float, help="seconds for the jobs to finish after the storm (default 300; quick 25)")
    ap.add_argument("--notice", type=float, default=3.0, help="simulators' preemption notice seconds")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="run the providers side by side (default: only with --quick)")
    ap.add_argument("--at-once", type=int, help="scenarios of one provider side by side (default 1; quick 2)")
    ap.add_argument("--details", type=int, default=6, help="detail lines per provider and scenario")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the state directories even when nothing missed")
    args = ap.parse_args()

    q = args.quick
    jobs = args.jobs or (6 if q else 50)
    knobs = Knobs(
        jobs=jobs, kills=args.kills if args.kills is not None else (3 if q else 30),
        preemptions=args.preemptions if args.preemptions is not None else (3 if q else jobs),
        kill_interval=args.kill_interval or (2.0 if q else 3.0), step_seconds=args.step_seconds or (0.3 if q else 0.5),
        steps=args.steps, heartbeat_timeout=args.heartbeat_timeout or (4.0 if q else 8.0),
        volume_submits=args.volume_submits, latency=args.latency, drain=args.drain or (25.0 if q else 300.0),
        notice=args.notice, seed=args.seed,
    )
    providers = [p for p in args.provider.split(",") if p]
    scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [p for p in providers if p not in PROVIDERS] + [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    parallel = args.parallel if args.parallel is not None else q
    at_once = args.at_once or (2 if q else 1)
    root = Path(tempfile.mkdtemp(prefix="gpuhop-storm-"))
    print(f"# fault storm: {', '.join(providers)}{' side by side' if parallel else ''}, {at_once} scenario(s) "
          f"at a time each; scenarios {', '.join(scenarios)}; {knobs.jobs} jobs, "
          f"{knobs.kills} kills every {knobs.kill_interval:g} s, {knobs.preemptions} preemptions per storm; "
          f"steps of {knobs.step_seconds:g} s; daemon tick 1 s, heartbeat timeout {knobs.heartbeat_timeout:g} s; "
          f"notice {knobs.notice:g} s; drain {knobs.drain:g} s; state in {root}", flush=True)
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    if parallel:
        threads = [threading.Thread(target=run_provider, args=(p, scenarios, knobs, root, outcomes, at_once))
                   for p in providers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for p in providers:
            run_provider(p, scenarios, knobs, root, outcomes, at_once)
    print_tables(outcomes, providers, scenarios, args.details)
    misses = sum(1 for o in outcomes for _, _, ok in rows_of(o) if ok is False)
    keep = args.keep or misses > 0
    print(f"\n{misses} figure(s) miss their target; {time.monotonic() - t0:.0f} s in all; daemon and "
          f"simulator logs, volumes: {root if keep else 'removed (nothing missed; --keep keeps them)'}")
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
