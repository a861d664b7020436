"""Several `gpuhop serve` replicas on one PostgreSQL database (issue 9): what a replica's
kill -9 costs, and what the API gains from more replicas.

Real processes only, as the other benchmarks: `gpuhop serve` replicas on one fresh PostgreSQL
schema (127.0.0.1:5432, database `test`, or $GPUHOP_TEST_PG_URL), the RunPod simulator
(`gpuhop sim runpod`), driven through the REST API, the simulator's `/_sim/*` admin API and the
database itself (read only). Two parts:

1. Adoption and duplicates under a kill. 3 replicas (lease TTL --ttl, claim interval
   --claim-interval, tick --tick) and the RunPod simulator; --jobs jobs submitted round-robin
   through the 3 replicas, each with its own network volume, running bench/_storm_job.py (a
   sleeping step counter that keeps an append-only step log in its volume). Once they run,
   --preemptions pods are taken away (POST /_sim/pods/{id}/preempt) spread over --window
   seconds, and --kill-after seconds into that window replica r0 (the leader) is killed with
   kill -9; after the kill, every other preemption hits a job of the dead replica. Figures:
   * adoption time: kill -> no unfinished job of the dead replica still names it in
     jobs.lease_owner (polled in the database every 50 ms), split into kill -> lease expiry
     (replicas.expires_at) and expiry -> the last job claimed; goal <= TTL + claim interval;
   * duplicates: attempt names carried by more than one pod in the simulator's /_sim/pods;
     attempts launched twice: the extra pods under one name; jobs on two machines at once:
     the most processes writing into one job's volume at the same time (activity logs);
   * jobs lost (ended other than succeeded) / stuck (not ended by the deadline);
   * healthy jobs relaunched: a job with more launched attempts than the preemptions it suffered + 1;
   * steps: each job's step log holds every step exactly once;
   * pods still running once every job ended (the new leader reaps them).
2. Submits/s with 1, 2 and 3 replicas: the same PostgreSQL (a fresh schema per replica count),
   no kill, --clients aiohttp clients spread round-robin over the replicas, --submits jobs each
   (after a short warm-up). The replicas have only a local provider without GPUs and the jobs ask
   for a GPU (submitted with ?force=true), so they stay queued: nothing is launched, but every
   replica's engine still reads and decides its queued jobs each tick (as bench/api_submits.py).

    python bench/replicas.py                # 300 jobs, 30 preemptions, 3,000 submits per count
    python bench/replicas.py --quick        # 30 jobs, 5 preemptions, 1,000 submits (< 2 minutes)
    python bench/replicas.py --part adoption --jobs 100

Everything it started (replicas, simulator, the simulated pods' processes, the schemas, the
temporary directory unless --keep) is removed at the end, on failure and on Ctrl-C too. A
benchmark, not a test: it prints the figures beside their goals and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/replicas.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench._storm_measure import VolumeRecord, max_overlap, read_volumes, step_audit  # noqa: E402
from orchestrator.client import ClientError  # noqa: E402
from simulators.harness import Daemon, SimProcess, wait_for  # noqa: E402

JOB = REPO / "bench" / "_storm_job.py"
KEY = "rpa_REPLICASBENCH0123456789"
GPU_TYPE = "NVIDIA GeForce RTX 4090"
PG_URL = os.environ.get("GPUHOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_PLAIN = PG_URL.replace("+psycopg", "")
ACTIVE = ("queued", "launching", "running", "recovering")
TERMINAL = ("succeeded", "failed", "cancelled")
NAME_RE = re.compile(r"gpuhop-([a-z0-9]+)-(\d+)")
SUBMIT_SPEC = {"name": "bench", "command": ["python3", "-c", "pass"], "resources": {"gpu": ["H100"]}}
T0 = time.monotonic()
GROWTH = 1.05  # "throughput grows with replicas": more than this factor over one replica fewer (not noise)


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {text}", flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


# --------------------------------------------------------------------------- what to clean up


class Resources:
    """Everything this run started, so that it all goes away whatever happens."""

    def __init__(self, root: Path, keep: bool) -> None:
        self.root = root
        self.keep = keep
        self.daemons: list[Daemon] = []
        self.sims: list[SimProcess] = []
        self.schemas: list[str] = []

    def new_schema(self) -> str:
        schema = f"bench_rep_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_PLAIN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        return schema

    def drop_schema(self, schema: str) -> None:
        for tries in range(3):
            try:
                with psycopg.connect(PG_PLAIN, autocommit=True) as conn:
                    conn.execute("SET lock_timeout = '10s'")
                    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                if schema in self.schemas:
                    self.schemas.remove(schema)
                return
            except psycopg.Error as exc:
                if tries == 2:
                    print(f"could not drop schema {schema}: {exc}", file=sys.stderr)
                time.sleep(1)

    def stop_daemons(self, daemons: list[Daemon], grace: float = 15.0) -> None:
        """SIGTERM every one at once (a clean stop retires its lease), SIGKILL what lingers."""
        live = [d for d in daemons if d.proc is not None and d.proc.poll() is None]
        for d in live:
            with contextlib.suppress(ProcessLookupError):
                assert d.proc is not None
                d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for d in live:
            assert d.proc is not None
            try:
                d.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(10)
        for d in daemons:
            if d in self.daemons:
                self.daemons.remove(d)

    def stop_sim(self, sim: SimProcess) -> None:
        with contextlib.suppress(Exception):
            sim.stop()
        self.reap_machines(sim.state_dir)
        if sim in self.sims:
            self.sims.remove(sim)

    @staticmethod
    def reap_machines(sim_root: Path) -> int:
        """SIGKILL any process a simulated pod left behind: they run in the simulator's work
        directories (a pod's cwd is <state>/work/<pod>), which nothing else on the host uses."""
        root = str(sim_root.resolve())
        n = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd == root or cwd.startswith(root + os.sep):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    n += 1
        return n

    def close(self) -> None:
        self.stop_daemons(list(self.daemons))
        for sim in list(self.sims):
            self.stop_sim(sim)
        for schema in list(self.schemas):
            self.drop_schema(schema)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def pg_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def db(schema: str) -> psycopg.Connection[Any]:
    return psycopg.connect(PG_PLAIN, autocommit=True, options=f"-csearch_path={schema}")


def start_replicas(res: Resources, configs: list[str], tag: str) -> list[Daemon]:
    daemons = [Daemon(res.root / f"{tag}-r{n}", cfg, log_level="INFO") for n, cfg in enumerate(configs)]
    res.daemons.extend(daemons)
    with ThreadPoolExecutor(len(daemons)) as pool:
        list(pool.map(lambda d: d.start(), daemons))
    for d in daemons:  # a benchmark's reads and submits may wait on a busy replica
        d.client.timeout = 30
    want = len(daemons) - 1

    def all_see_each_other() -> bool:
        try:
            return all(len(d.client.status()["peers"]) == want for d in daemons)
        except (ClientError, OSError):
            return False

    wait_for(all_see_each_other, 60, interval=0.3, what="replicas see each other")
    return daemons


# --------------------------------------------------------------------------- part 1


@dataclass
class Knobs:
    jobs: int
    preemptions: int
    steps: int
    step_seconds: float
    window: float
    kill_after: float
    kill_at_launch: bool
    ttl: float
    claim_interval: float
    tick: float
    heartbeat: float
    heartbeat_timeout: float
    notice: float
    drain: float
    seed: int


@dataclass
class Adoption:
    dead: str = ""
    jobs_at_kill: int = 0
    killed_at: float = 0.0  # wall clock
    expires_at: float | None = None  # the dead replica's lease, as its row says
    first_claim: float | None = None
    all_claimed: float | None = None
    new_owners: Counter[str] = field(default_factory=Counter)


@dataclass
class Part1:
    knobs: Knobs
    jobs: dict[str, int] = field(default_factory=dict)  # job id -> replica index it was submitted to
    submit_errors: int = 0
    running_after: float | None = None  # submit start -> every job running
    preempted: dict[str, str] = field(default_factory=dict)  # pod id -> job id
    preempted_before_kill: int = 0
    preempted_dead_jobs: int = 0  # after the kill, pods of the dead replica's jobs
    preempted_before_adoption: int = 0
    adoption: Adoption = field(default_factory=Adoption)
    statuses: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, list[tuple[int, str, str, str | None, str | None]]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    pods_running_after: int = 0
    volumes_root: Path | None = None
    volumes: list[VolumeRecord] = field(default_factory=list)  # read before the state dir goes
    notes: list[str] = field(default_factory=list)
    error: str = ""


def part1_config(sim: SimProcess, schema: str, n: int, k: Knobs) -> str:
    return f"""
[database]
url = "{pg_url(schema)}"
[cluster]
replica_id = "r{n}"
lease_ttl_seconds = {k.ttl:g}
claim_interval_seconds = {k.claim_interval:g}
[engine]
tick_seconds = {k.tick:g}
launch_grace_seconds = 20
heartbeat_seconds = {k.heartbeat:g}
heartbeat_timeout_seconds = {k.heartbeat_timeout:g}
offer_refresh_seconds = 5
retry_backoff_max_seconds = 2
[providers.runpod]
api_key = "{KEY}"
api_url = "{sim.url}"
request_timeout_seconds = 10
"""


def job_spec(i: int, k: Knobs) -> dict[str, Any]:
    return {
        "name": f"rep-{i}", "image": "python:3.11-slim",
        "command": ["python3", str(JOB), "--steps", str(k.steps), "--step-seconds", f"{k.step_seconds:g}"],
        "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
        "placement": {"providers": ["runpod"], "capacity": "on-demand"},
        "policy": {"checkpoint_interval": 1, "max_relaunches": 50},
        "volume": {"name": f"rep-{i}-ckpt", "size_gb": 10, "mount_path": "/workspace"},
    }


def job_status(conn: psycopg.Connection[Any]) -> dict[str, tuple[str, str | None]]:
    return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, status, lease_owner FROM jobs")}


class AdoptionWatch(threading.Thread):
    """Polls the database from the kill on until no unfinished job of the dead replica names it."""

    def __init__(self, schema: str, out: Adoption, jobs: set[str], timeout: float) -> None:
        super().__init__(daemon=True)
        self.schema, self.out, self.jobs, self.timeout = schema, out, jobs, timeout
        self.stop = threading.Event()

    def run(self) -> None:
        out = self.out
        with db(self.schema) as conn:
            row = conn.execute("SELECT expires_at FROM replicas WHERE id = %s", (out.dead,)).fetchone()
            out.expires_at = float(row[0]) if row else None
            deadline = time.monotonic() + self.timeout
            while not self.stop.is_set() and time.monotonic() < deadline:
                rows = conn.execute("SELECT id, status, lease_owner FROM jobs WHERE id = ANY(%s)",
                                    (list(self.jobs),)).fetchall()
                now = time.time()
                left = [r for r in rows if r[2] in (out.dead, None) and r[1] not in TERMINAL]
                if out.first_claim is None and len(left) < len(self.jobs):
                    out.first_claim = now
                if not left:
                    out.all_claimed = now
                    out.new_owners = Counter(str(r[2]) for r in rows)
                    return
                self.stop.wait(0.05)


class Run1:
    def __init__(self, res: Resources, k: Knobs) -> None:
        self.res = res
        self.k = k
        self.out = Part1(k)
        self.rng = random.Random(k.seed)
        self.sim: SimProcess | None = None
        self.replicas: list[Daemon] = []
        self.schema = ""
        self.dead_jobs: set[str] = set()
        self.killed = False
        self.watch: AdoptionWatch | None = None
        self.t_submit = time.monotonic()

    def live(self) -> list[Daemon]:
        return [d for d in self.replicas if d.proc is not None and d.proc.poll() is None]

    def run(self) -> Part1:
        k = self.k
        try:
            self.schema = self.res.new_schema()
            self.sim = SimProcess("runpod", self.res.root / "sim", "--api-key", KEY, "--notice-seconds",
                                  f"{k.notice:g}", "--start-delay", "0.3")
            self.res.sims.append(self.sim)
            self.out.volumes_root = self.sim.state_dir / "volumes"
            # enough Secure Cloud 4090s everywhere for every job and its relaunches
            self.sim.admin("POST", "/_sim/capacity", {"count": 2 * k.jobs + 50, "gpu_type": GPU_TYPE,
                                                      "cloud_type": "secure"})
            configs = [part1_config(self.sim, self.schema, n, k) for n in range(3)]
            self.replicas = start_replicas(self.res, configs, "p1")
            say(f"part 1: 3 replicas up on schema {self.schema}; submitting {k.jobs} jobs x {k.steps} steps "
                f"of {k.step_seconds:g} s round-robin")
            self.submit_all()
            if k.kill_at_launch:  # while the dead replica's jobs are still being launched
                time.sleep(0.5)
                self.kill()
            self.wait_running()
            self.storm()
            self.drain()
        except Exception as exc:  # a benchmark reports what broke instead of dying
            self.out.error = f"{type(exc).__name__}: {str(exc)[-600:]}"
            say(f"part 1 aborted: {self.out.error}")
        finally:
            if self.watch is not None:
                self.watch.stop.set()
            with contextlib.suppress(Exception):
                self.collect()
            self.res.stop_daemons(self.replicas)
            if self.sim is not None:
                self.res.stop_sim(self.sim)
            if self.schema:
                self.res.drop_schema(self.schema)
        return self.out

    def submit_all(self) -> None:
        t0 = time.monotonic()

        def one(i: int) -> tuple[int, str | None]:
            client = self.replicas[i % 3].client
            for _ in range(5):
                try:
                    return i, client.submit(job_spec(i, self.k))["id"]
                except ClientError as exc:
                    if 400 <= exc.status < 500:  # refused (a retry after a lost answer meets its volume)
                        return i, None
                    time.sleep(0.5)
                except OSError:
                    time.sleep(0.5)
            return i, None

        with ThreadPoolExecutor(6) as pool:
            for i, job_id in pool.map(one, range(self.k.jobs)):
                if job_id is None:
                    self.out.submit_errors += 1
                else:
                    self.out.jobs[job_id] = i % 3
        self.t_submit = t0
        say(f"{len(self.out.jobs)} jobs submitted in {time.monotonic() - t0:.1f} s "
            f"({self.out.submit_errors} not accepted)")

    def wait_running(self) -> None:
        limit = 30 + self.k.jobs * 0.4
        deadline = time.monotonic() + limit
        last = 0.0
        with db(self.schema) as conn:
            while time.monotonic() < deadline:
                st = Counter(s for s, _ in job_status(conn).values())
                if st["running"] + sum(st[s] for s in TERMINAL) >= len(self.out.jobs):
                    self.out.running_after = time.monotonic() - self.t_submit
                    say(f"every job running {self.out.running_after:.1f} s after the first submit")
                    return
                if time.monotonic() - last > 5:
                    say(f"waiting for the jobs to run: {dict(st)}")
                    last = time.monotonic()
                time.sleep(0.5)
        self.out.notes.append(f"not every job was running after {limit:.0f} s; the storm started anyway")

    # -- the storm: preemptions spread over the window, one kill -9 inside it

    def preempt_one(self, prefer_dead: bool) -> bool:
        assert self.sim is not None
        pods = self.sim.admin("GET", "/_sim/pods")["pods"]
        margin = max(5, int(3 / self.k.step_seconds) + 1)
        taken_jobs = set(self.out.preempted.values())
        candidates: list[tuple[str, str]] = []
        for p in pods:
            m = NAME_RE.fullmatch(str(p.get("name") or ""))
            if not m or p.get("desiredStatus") != "RUNNING" or not p.get("processRunning"):
                continue
            job = m.group(1)
            if job not in self.out.jobs or job in taken_jobs:
                continue
            ckpt = Path(p["volumeDir"]) / "jobs" / job / "checkpoint.json"
            try:  # not one about to finish: its exit and the preemption would race
                step = int(json.loads(ckpt.read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                step = 0
            if step > self.k.steps - margin:
                continue
            candidates.append((p["id"], job))
        if prefer_dead:
            dead = [c for c in candidates if c[1] in self.dead_jobs]
            candidates = dead or candidates
        self.rng.shuffle(candidates)
        for pod_id, job in candidates[:3]:
            try:
                self.sim.admin("POST", f"/_sim/pods/{pod_id}/preempt", {})
            except urllib.error.HTTPError:
                continue
            self.out.preempted[pod_id] = job
            if not self.killed:
                self.out.preempted_before_kill += 1
            else:
                self.out.preempted_dead_jobs += job in self.dead_jobs
                self.out.preempted_before_adoption += self.out.adoption.all_claimed is None
            return True
        return False

    def kill(self) -> None:
        victim = self.replicas[0]
        ad = self.out.adoption
        ad.dead = "r0"
        with db(self.schema) as conn:
            ad_jobs = {r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE lease_owner = %s AND status = ANY(%s)", ("r0", list(ACTIVE)))}
        self.dead_jobs = ad_jobs
        ad.jobs_at_kill = len(ad_jobs)
        ad.killed_at = time.time()
        victim.kill9()
        self.killed = True
        self.watch = AdoptionWatch(self.schema, ad, ad_jobs, timeout=max(60.0, 10 * self.k.ttl))
        self.watch.start()
        say(f"kill -9 replica r0 (the leader), which owned {ad.jobs_at_kill} unfinished job(s)")

    def storm(self) -> None:
        k = self.k
        t0 = time.monotonic()
        gap = k.window / max(1, k.preemptions)
        due = [t0 + (i + 0.5) * gap for i in range(k.preemptions)]
        kill_at = t0 + k.kill_after
        give_up = t0 + 2 * k.window + 20
        done = 0
        after_kill = 0
        say(f"storm: {k.preemptions} preemptions over {k.window:g} s"
            + ("" if self.killed else f", kill -9 at {k.kill_after:g} s"))
        while time.monotonic() < give_up and (not self.killed or done < k.preemptions):
            now = time.monotonic()
            if not self.killed and now >= kill_at:
                self.kill()
            if done < k.preemptions and now >= due[done]:
                prefer_dead = self.killed and after_kill % 2 == 0
                if self.preempt_one(prefer_dead):
                    done += 1
                    after_kill += self.killed
                else:
                    due[done] = now + 0.5
            time.sleep(0.05)
        if done < k.preemptions:
            self.out.notes.append(f"storm cut short: {done}/{k.preemptions} preemptions (no running pod to take)")
        if self.watch is not None:
            self.watch.join(max(0.0, self.watch.timeout - (time.time() - self.out.adoption.killed_at)))
            ad = self.out.adoption
            with contextlib.suppress(ClientError, OSError, KeyError):
                leaders = [d.client.status()["replica"] for d in self.live() if d.client.status()["leader"]]
                self.out.notes.append(f"leader after the kill: {', '.join(leaders) or 'none'}")
            if ad.all_claimed is not None:
                say(f"adopted: every job of r0 owned by a live replica {ad.all_claimed - ad.killed_at:.2f} s "
                    f"after the kill ({dict(ad.new_owners)})")
            else:
                say("the dead replica's jobs were not all adopted")

    def drain(self) -> None:
        work = self.k.steps * self.k.step_seconds
        deadline = time.monotonic() + work + self.k.drain
        last = 0.0
        with db(self.schema) as conn:
            while time.monotonic() < deadline:
                st = {j: s for j, (s, _) in job_status(conn).items() if j in self.out.jobs}
                if len(st) == len(self.out.jobs) and all(s in TERMINAL for s in st.values()):
                    say("every job ended")
                    break
                if time.monotonic() - last > 10:
                    say(f"draining: {dict(Counter(st.values()))}")
                    last = time.monotonic()
                time.sleep(1)
        # give the new leader a moment to stop the pods of ended jobs
        assert self.sim is not None
        for _ in range(20):
            pods = self.sim.admin("GET", "/_sim/pods")["pods"]
            if not [p for p in pods if p.get("desiredStatus") == "RUNNING" and p.get("processRunning")]:
                break
            time.sleep(1)

    def collect(self) -> None:
        o = self.out
        if self.schema:
            with db(self.schema) as conn:
                o.statuses = {j: s for j, (s, _) in job_status(conn).items()}
                for job_id, number, name, status, reason, instance in conn.execute(
                        "SELECT job_id, number, name, status, end_reason, instance_id FROM attempts ORDER BY number"):
                    o.attempts.setdefault(job_id, []).append((number, name, status, reason, instance))
        if self.sim is not None:
            o.pods = self.sim.admin("GET", "/_sim/pods")["pods"]
            if o.volumes_root is not None:
                o.volumes = read_volumes(o.volumes_root)
            o.pods_running_after = sum(1 for p in o.pods if p.get("desiredStatus") == "RUNNING"
                                       and p.get("processRunning") and p.get("name", "").startswith("gpuhop-"))


@dataclass
class Figures1:
    rows: list[tuple[str, str, str, bool | None]]
    details: list[str]


def figures1(o: Part1) -> Figures1:
    k = o.knobs
    rows: list[tuple[str, str, str, bool | None]] = []
    details: list[str] = []
    ad = o.adoption
    goal = k.ttl + k.claim_interval
    if ad.all_claimed is not None:
        t = ad.all_claimed - ad.killed_at
        rows.append(("adoption time (kill -> all owned by live)", f"{t:.2f} s",
                     f"<= {goal:g} s (TTL {k.ttl:g} + claim {k.claim_interval:g})", t <= goal))
        if ad.expires_at is not None:
            rows.append(("  kill -> lease expiry / -> last claim",
                         f"{ad.expires_at - ad.killed_at:.2f} / {ad.all_claimed - ad.expires_at:.2f} s",
                         f"<= {k.ttl:g} / <= {k.claim_interval:g} s", None))
        if ad.first_claim is not None:
            rows.append(("  kill -> first claim", f"{ad.first_claim - ad.killed_at:.2f} s", "", None))
        rows.append(("  dead replica's unfinished jobs / taken by",
                     f"{ad.jobs_at_kill} / " + ", ".join(f"{r} {n}" for r, n in sorted(ad.new_owners.items())),
                     "", None))
    else:
        rows.append(("adoption time (kill -> all owned by live)", "not adopted" if ad.killed_at else "no kill",
                     f"<= {goal:g} s", False))

    per_name: dict[str, set[str]] = defaultdict(set)
    for p in o.pods:
        if NAME_RE.fullmatch(str(p.get("name") or "")):
            per_name[p["name"]].add(str(p["id"]))
    dups = {n: ids for n, ids in per_name.items() if len(ids) > 1}
    for n, ids in dups.items():
        details.append(f"{n}: {len(ids)} pods ({', '.join(sorted(ids))})")
    rows.append(("duplicates: names on > 1 pod (max pods/name)",
                 f"{len(dups)} ({max((len(v) for v in per_name.values()), default=0)})", "0 (1)", not dups))
    rows.append(("attempts launched twice (extra pods)", str(sum(len(v) - 1 for v in dups.values())), "0", not dups))
    writers = 0
    vols = o.volumes
    for v in vols:
        w = max_overlap([(r.begin, r.end) for r in v.runners])
        if w > 1:
            details.append(f"volume {v.name}: {w} processes wrote at once")
        writers = max(writers, w)
    rows.append(("jobs on two machines at once (max writers)", str(writers), "1", writers <= 1))

    ours = o.jobs
    lost = [j for j in ours if o.statuses.get(j) in ("failed", "cancelled") or j not in o.statuses]
    stuck = [j for j in ours if o.statuses.get(j) in ACTIVE]
    for j in lost + stuck:
        details.append(f"job {j}: {o.statuses.get(j, 'unknown to the database')}")
    rows.append(("jobs lost / stuck at the deadline", f"{len(lost)} / {len(stuck)}", "0 / 0",
                 not lost and not stuck))

    preempted_of: Counter[str] = Counter(o.preempted.values())
    relaunched = []
    for j in ours:
        launched = [a for a in o.attempts.get(j, []) if a[4]]  # the provider accepted it (has a pod id)
        if len(launched) > preempted_of[j] + 1:
            relaunched.append(j)
            details.append(f"job {j}: {len(launched)} attempts, {preempted_of[j]} preemption(s): "
                           + ", ".join(f"#{a[0]} {a[3] or a[2]}" for a in launched))
    rows.append(("healthy jobs relaunched", str(len(relaunched)), "0", not relaunched))

    once = twice = skipped = 0
    steps_of = {job: steps for v in vols for job, steps in v.steps.items()}
    for j in ours:
        t, s = step_audit(steps_of.get(j, []), k.steps if o.statuses.get(j) == "succeeded" else None)
        twice, skipped = twice + t, skipped + s
        if o.statuses.get(j) == "succeeded" and not t and not s and len(steps_of.get(j, [])) == k.steps:
            once += 1
        elif t or s:
            details.append(f"job {j}: {t} step(s) twice, {s} skipped")
    rows.append(("jobs with every step exactly once", f"{once} / {len(ours)}", f"{len(ours)} / {len(ours)}",
                 once == len(ours)))
    rows.append(("  steps run twice / skipped", f"{twice} / {skipped}", "0 / 0", not twice and not skipped))
    rows.append(("pods still running after the jobs ended", str(o.pods_running_after), "0",
                 o.pods_running_after == 0))
    rows.append(("preemptions: before kill / after (dead's jobs)",
                 f"{o.preempted_before_kill} / {len(o.preempted) - o.preempted_before_kill} "
                 f"({o.preempted_dead_jobs}, {o.preempted_before_adoption} before adoption)", "", None))
    if o.running_after is not None:
        rows.append(("first submit -> every job running", f"{o.running_after:.1f} s", "", None))
    return Figures1(rows, details)


# --------------------------------------------------------------------------- part 2


def part2_config(schema: str, n: int, tick: float, ttl: float, claim: float) -> str:
    return f"""
[database]
url = "{pg_url(schema)}"
[cluster]
replica_id = "s{n}"
lease_ttl_seconds = {ttl:g}
claim_interval_seconds = {claim:g}
[engine]
tick_seconds = {tick:g}
[providers.local]
cpu_slots = 1
gpu_slots = 0
isolation = "none"
"""


async def submit_load(targets: list[tuple[str, str]], total: int, clients: int) -> tuple[float, list[float], int]:
    """`clients` clients, client i on replica i % n, `total` submits in all as fast as answered."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def client(session: aiohttp.ClientSession, url: str, token: str) -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {token}"}
        for _ in counter:
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/jobs?force=true", json=SUBMIT_SPEC, headers=headers) as resp:
                    await resp.read()
                    errors += resp.status != 201
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, *targets[i % len(targets)]) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return total / elapsed, latencies, errors


@dataclass
class Part2Row:
    replicas: int
    submits: int
    rate: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    errors: int = 0
    error: str = ""
    seconds: float = 0.0
    busy: float = 0.0  # share of the machine's CPU time busy (all processes) during the timed run
    replica_cpu: float = 0.0  # CPU seconds the replicas used
    client_cpu: float = 0.0  # CPU seconds this process (the clients) used


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) one process used so far."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (float(parts[11]) + float(parts[12])) / os.sysconf("SC_CLK_TCK")


def part2(res: Resources, counts: list[int], submits: int, clients: int, tick: float, ttl: float,
          claim: float) -> list[Part2Row]:
    rows = []
    for n in counts:
        row = Part2Row(n, submits)
        schema = res.new_schema()
        daemons: list[Daemon] = []
        try:
            daemons = start_replicas(res, [part2_config(schema, i, tick, ttl, claim) for i in range(n)], f"p2-{n}")
            targets = [(d.client.url, d.client.token) for d in daemons]
            asyncio.run(submit_load(targets, 20 * n, min(clients, 10 * n)))  # warm-up
            pids = [d.proc.pid for d in daemons if d.proc is not None]
            m0, r0, c0, t0 = machine_cpu(), sum(map(process_cpu, pids)), time.process_time(), time.monotonic()
            rate, lat, errors = asyncio.run(submit_load(targets, submits, clients))
            m1 = machine_cpu()
            row.seconds = time.monotonic() - t0
            row.busy = (m1[0] - m0[0]) / max(1.0, m1[1] - m0[1])
            row.replica_cpu = sum(map(process_cpu, pids)) - r0
            row.client_cpu = time.process_time() - c0
            row.rate, row.p50, row.p99, row.errors = rate, statistics.median(lat), pct(lat, 0.99), errors
            say(f"part 2: {n} replica(s): {rate:,.0f} submits/s, p50 {row.p50 * 1000:.0f} ms, "
                f"p99 {row.p99 * 1000:.0f} ms, {errors} not 201")
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {str(exc)[-300:]}"
            say(f"part 2 with {n} replica(s) aborted: {row.error}")
        finally:
            res.stop_daemons(daemons)
            res.drop_schema(schema)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the tables


def mark(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISS")


def print_part1(o: Part1) -> int:
    k = o.knobs
    print(f"\n== 1. adoption and duplicates under a kill: 3 replicas on one PostgreSQL schema, RunPod simulator; "
          f"{len(o.jobs)} jobs x {k.steps} steps of {k.step_seconds:g} s (one volume each), "
          f"{len(o.preempted)} preemptions (notice {k.notice:g} s) over {k.window:g} s, r0 (the leader) "
          + ("kill -9'd 0.5 s after the submits" if k.kill_at_launch else f"kill -9'd {k.kill_after:g} s in")
          + f"; TTL {k.ttl:g} s, claim interval {k.claim_interval:g} s, "
          f"tick {k.tick:g} s, agent heartbeat {k.heartbeat:g} s (timeout {k.heartbeat_timeout:g} s)")
    if o.error:
        print(f"  aborted: {o.error}")
    f = figures1(o)
    print(f"{'figure':46s} {'result':>30s}  {'goal':30s}")
    print("-" * 114)
    for name, value, goal, ok in f.rows:
        print(f"{name:46s} {value:>30s}  {goal:30s} {mark(ok)}")
    for note in o.notes:
        print(f"  - {note}")
    for line in f.details[:12]:
        print(f"  - {line}")
    if len(f.details) > 12:
        print(f"  - ... {len(f.details) - 12} more")
    return sum(1 for r in f.rows if r[3] is False)


def print_part2(rows: list[Part2Row], clients: int) -> int:
    print(f"\n== 2. submits/s by replica count: one PostgreSQL (a fresh schema each), no kill, {clients} aiohttp "
          "clients spread round-robin over the replicas; jobs ask for a GPU on a local provider without GPUs "
          "(?force=true), so they stay queued and nothing runs; client and replicas share this machine's "
          f"{os.cpu_count()} cores")
    print(f"{'replicas':>8s} {'submits':>8s} {'submits/s':>10s} {'p50 ms':>7s} {'p99 ms':>7s} {'not 201':>8s}  "
          f"{'goal':34s}")
    print("-" * 92)
    misses = 0
    prev: float | None = None
    cpu_notes: list[str] = []
    for r in rows:
        if r.error:
            print(f"{r.replicas:8d} aborted: {r.error}  MISS")
            misses += 1
            prev = None
            continue
        grows = None if prev is None else r.rate > GROWTH * prev
        goal = "baseline" if prev is None else f"> {GROWTH * prev:,.0f}/s (+{GROWTH - 1:.0%}: grows)"
        misses += grows is False
        print(f"{r.replicas:8d} {r.submits:8,d} {r.rate:10,.0f} {r.p50 * 1000:7.0f} {r.p99 * 1000:7.0f} "
              f"{r.errors:8d}  {goal:34s} {mark(grows)}")
        cpu_notes.append(f"{r.replicas} replica(s): {r.seconds:.1f} s; machine CPU {r.busy:.0%} busy; replicas "
                         f"{r.replica_cpu:.1f} CPU-s, clients {r.client_cpu:.1f} CPU-s (the rest: PostgreSQL and "
                         "anything else running)")
        prev = r.rate
    for note in cpu_notes:
        print(f"  - {note}")
    return misses


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP end the run through the clean-up (SIGINT too when it was
    inherited as ignored, as in a background job)."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 jobs, 5 preemptions, 1,000 submits (< 2 minutes)")
    ap.add_argument("--part", choices=("both", "adoption", "throughput"), default="both")
    ap.add_argument("--jobs", type=int, help="jobs in part 1 (default 300; quick 30)")
    ap.add_argument("--preemptions", type=int, help="pods taken away in part 1 (default jobs/10; quick 5)")
    ap.add_argument("--steps", type=int, help="steps per job (default: outlast the launches and the storm)")
    ap.add_argument("--step-seconds", type=float, help="seconds per step (default 1; quick 0.5)")
    ap.add_argument("--window", type=float, help="seconds the preemptions are spread over (default 30; quick 12)")
    ap.add_argument("--kill-after", type=float, help="kill -9 this far into the window (default window/3)")
    ap.add_argument("--kill-at-launch", action="store_true",
                    help="kill r0 0.5 s after the submits, while its launches are in flight, instead")
    ap.add_argument("--ttl", type=float, default=5.0, help="[cluster] lease_ttl_seconds")
    ap.add_argument("--claim-interval", type=float, default=0.5, help="[cluster] claim_interval_seconds")
    ap.add_argument("--tick", type=float, help="[engine] tick_seconds (default 1; quick 0.5)")
    ap.add_argument("--heartbeat", type=float, default=3.0, help="agents' heartbeat_seconds")
    ap.add_argument("--heartbeat-timeout", type=float, default=30.0, help="heartbeat_timeout_seconds")
    ap.add_argument("--notice", type=float, default=1.0, help="the simulator's preemption notice")
    ap.add_argument("--drain", type=float, help="seconds past the jobs' own work for them to end (default 90; quick 40)")
    ap.add_argument("--submits", type=int, help="submits per replica count in part 2 (default 3000; quick 1000)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients in part 2")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--keep", action="store_true", help="keep the state directory (logs, volumes)")
    args = ap.parse_args()

    q = args.quick
    jobs = args.jobs or (30 if q else 300)
    step_seconds = args.step_seconds or (0.5 if q else 1.0)
    window = args.window or (12.0 if q else 30.0)
    launch_allowance = 5 + jobs * 0.12  # first submit -> every job running, roughly, on 2 cores
    steps = args.steps or int((launch_allowance + window + 10) / step_seconds)
    knobs = Knobs(
        jobs=jobs, preemptions=args.preemptions if args.preemptions is not None else (5 if q else max(1, jobs // 10)),
        steps=steps, step_seconds=step_seconds, window=window,
        kill_after=args.kill_after if args.kill_after is not None else window / 3,
        kill_at_launch=args.kill_at_launch,
        ttl=args.ttl, claim_interval=args.claim_interval, tick=args.tick or (0.5 if q else 1.0),
        heartbeat=args.heartbeat, heartbeat_timeout=args.heartbeat_timeout, notice=args.notice,
        drain=args.drain or (40.0 if q else 90.0), seed=args.seed,
    )
    submits = args.submits or (1000 if q else 3000)
    root = Path(tempfile.mkdtemp(prefix="gpuhop-replicas-"))
    res = Resources(root, args.keep)
    print(f"# replicas benchmark{' (quick)' if q else ''}: PostgreSQL {PG_PLAIN.split('@')[-1]}; "
          f"state in {root}", flush=True)
    misses = 0
    p1: Part1 | None = None
    p2: list[Part2Row] = []
    interrupted = False
    try:
        with interrupts_as_keyboard():
            if args.part in ("both", "adoption"):
                p1 = Run1(res, knobs).run()
            if args.part in ("both", "throughput"):
                p2 = part2(res, [1, 2, 3], submits, args.clients, knobs.tick, knobs.ttl, knobs.claim_interval)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: cleaning up", flush=True)
    finally:
        held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:  # a second Ctrl-C must not leave half of it running
            res.close()
        finally:
            for s, h in held.items():
                signal.signal(s, h)
    if p1 is not None:
        misses += print_part1(p1)
    if p2:
        misses += print_part2(p2, args.clients)
    print(f"\n{misses} figure(s) miss their goal; {time.monotonic() - T0:.0f} s in all; replicas, simulator, "
          f"pods and schemas stopped and dropped; state {root if args.keep else 'removed (--keep keeps it)'}"
          + ("; INTERRUPTED" if interrupted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
