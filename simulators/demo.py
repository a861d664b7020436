"""`gpuhop demo`: the whole thing working, with no cloud account and nothing to set up.

It starts the simulated providers in this process, a real `gpuhop serve` daemon in a temporary
state directory, submits a few small training jobs that checkpoint into their volumes, takes
machines away from some of them along the way (a RunPod preemption, a lost local machine), and
shows the placements, preemptions and relaunches live. It ends with what each job cost and how
many attempts it took, checks every step ran exactly once, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from orchestrator import render
from orchestrator.client import Client, ClientError
from simulators.harness import Daemon, steps_done

TRAIN = Path(__file__).resolve().parent / "demo_train.py"
TERMINAL = {"succeeded", "failed", "cancelled"}
AWS_NOTICE = 8.0  # AWS gives 120 s; the demo is in a hurry


@dataclass
class Disruption:
    """Take the job's machine away once it has done `after_steps` steps."""

    kind: str  # "preempt" (RunPod's host goes away), "interrupt" (AWS spot warning) or "kill" (the machine dies)
    after_steps: int
    done: bool = False


@dataclass
class DemoJob:
    spec: dict[str, Any]
    volume: str
    steps: int
    disruption: Disruption | None = None
    job_id: str = ""
    notes: list[str] = field(default_factory=list)


def _job(name: str, steps: int, gpu: list[str] | None, disruption: Disruption | None,
         capacity: str = "auto", providers: list[str] | None = None) -> DemoJob:
    spec: dict[str, Any] = {
        "name": name,
        "image": "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
        "command": ["python3", str(TRAIN), "--steps", str(steps), "--step-seconds", "0.5"],
        "resources": {"gpu": gpu, "gpu_count": 1} if gpu else {"gpu_count": 0},
        "placement": {"capacity": capacity, **({"providers": providers} if providers else {})},
        "volume": {"name": f"{name}-ckpt", "size_gb": 20, "mount_path": "/workspace"},
        "policy": {"max_relaunches": 5, "checkpoint_interval": 1},
    }
    return DemoJob(spec, f"{name}-ckpt", steps, disruption)


def demo_jobs() -> list[DemoJob]:
    return [
        _job("llama-finetune", 24, ["RTX-4090"], Disruption("preempt", 8), providers=["runpod"]),
        # RunPod has no spot since September 2026: its interruption is a host that goes away
        _job("sdxl-lora", 20, ["RTX-A6000", "L40S"], Disruption("preempt", 6), capacity="on-demand",
             providers=["runpod"]),
        _job("whisper-eval", 16, ["L40S"], None, providers=["runpod"]),
        _job("bert-pretrain", 24, ["A10G"], Disruption("interrupt", 6), capacity="spot", providers=["aws"]),
        _job("tokenize-corpus", 18, None, Disruption("kill", 5), providers=["local"]),
    ]


def _config(runpod_url: str, runpod_key: str, aws_url: str) -> str:
    return f"""
[server]
[engine]
tick_seconds = 0.5
launch_grace_seconds = 10
heartbeat_seconds = 1
heartbeat_timeout_seconds = 30
offer_refresh_seconds = 2
stop_grace_seconds = 2
[providers.local]
cpu_slots = 2
isolation = "none"  # the demo's jobs run this checkout's Python, which a job user may not reach
[providers.runpod]
api_key = "{runpod_key}"
api_url = "{runpod_url}"
[providers.aws]
regions = ["us-east-1"]
endpoint_url = "{aws_url}"
access_key_id = "demo"
secret_access_key = "demo"
"""



class Demo:
    def __init__(self, console: Console, keep: bool) -> None:
        self.console = console
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="gpuhop-demo-"))
        self.state = self.root / "daemon"
        self.daemon: Daemon | None = None
        self.client: Client | None = None
        self.jobs = demo_jobs()
        self.feed: list[str] = []
        self.seen_events: dict[str, int] = {}

    async def run(self) -> int:
        from simulators.aws import AwsSimulator
        from simulators.runpod import RunPodSimulator

        sim = RunPodSimulator(self.root / "runpod", start_delay=1.0, notice_seconds=2.0)
        aws = AwsSimulator(self.root / "aws", notice_seconds=AWS_NOTICE, boot_delay=2.0)
        self.sim_url = await sim.start()
        self.aws_url = await aws.start()
        try:
            # the daemon talks to the simulators in this process while it starts and stops: keep
            # this event loop free to answer by waiting on it from a worker thread
            await asyncio.to_thread(self._start_daemon, self.sim_url, sim.api_key, self.aws_url)
            return await self._drive()
        finally:
            await asyncio.to_thread(self._stop_daemon)
            await sim.stop()
            await aws.stop()
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                self.console.print(f"state kept in {self.root}")

    def _start_daemon(self, runpod_url: str, runpod_key: str, aws_url: str) -> None:
        self.daemon = Daemon(self.state, _config(runpod_url, runpod_key, aws_url), log_level="INFO")
        self.daemon.config_path.chmod(0o600)  # it holds the (simulated) RunPod key
        self.client = self.daemon.start()

    def _stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    async def _api(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _drive(self) -> int:
        assert self.client is not None
        c = self.client
        for j in self.jobs:
            created = await self._api(c.submit, j.spec)
            j.job_id = created["id"]
            self.feed.append(f"submitted {j.spec['name']} as {j.job_id}")
        deadline = time.monotonic() + 240
        with Live(console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                details = [await self._api(c.job, j.job_id) for j in self.jobs]
                self._collect_events(details)
                await self._disrupt(details)
                live.update(self._view(details))
                if all(d["status"] in TERMINAL for d in details):
                    break
                if time.monotonic() > deadline:
                    self.feed.append("the demo took too long; stopping")
                    break
                await asyncio.sleep(0.5)
        ledgers = []
        async with aiohttp.ClientSession() as s:
            for url in (self.sim_url, self.aws_url):
                async with s.get(f"{url}/_sim/ledger") as resp:
                    ledgers.append(await resp.json())
        return self._summary(details, ledgers)

    def _collect_events(self, details: list[dict[str, Any]]) -> None:
        for d in details:
            events = d.get("events", [])
            start = self.seen_events.get(d["id"], 0)
            for e in events[start:]:
                if e["kind"] in ("launched", "running", "preempted", "lost", "succeeded", "failed", "no_capacity",
                                 "interruption"):
                    msg = e["message"].split(";")[0] if e["kind"] == "launched" else e["message"]
                    self.feed.append(f"{e['at'][11:19]}  {d['name']:<16} {msg[:110]}")
            self.seen_events[d["id"]] = len(events)

    async def _disrupt(self, details: list[dict[str, Any]]) -> None:
        for j, d in zip(self.jobs, details, strict=True):
            dis = j.disruption
            if dis is None or dis.done or d["status"] != "running" or not d["attempts"]:
                continue
            attempt = d["attempts"][-1]
            volume_dir = self._volume_dir(d, attempt)
            if volume_dir is None or len(steps_done(volume_dir)) < dis.after_steps:
                continue
            dis.done = True
            if dis.kind == "interrupt":
                async with aiohttp.ClientSession() as s:
                    await s.post(f"{self.aws_url}/_sim/instances/{attempt['instance_id']}/interrupt")
                self.feed.append(f"{time.strftime('%H:%M:%S', time.gmtime())}  {d['name']:<16} "
                                 f"!! AWS spot interruption warning for {attempt['instance_id']} "
                                 f"(reclaimed in {AWS_NOTICE:.0f} s)")
            elif dis.kind == "preempt":
                async with aiohttp.ClientSession() as s:
                    await s.post(f"{self.sim_url}/_sim/pods/{attempt['instance_id']}/preempt")
                self.feed.append(f"{time.strftime('%H:%M:%S', time.gmtime())}  {d['name']:<16} "
                                 f"!! the host of RunPod pod {attempt['instance_id']} goes away (SIGTERM, 2 s notice)")
            else:
                job_pid = self.state / "local" / "instances" / attempt["name"] / "job.pid"
                with contextlib.suppress(OSError, ValueError):
                    os.killpg(int(job_pid.read_text()), signal.SIGKILL)
                self.feed.append(f"{time.strftime('%H:%M:%S', time.gmtime())}  {d['name']:<16} "
                                 "!! the machine dies under the job (SIGKILL)")

    def _volume_dir(self, detail: dict[str, Any], attempt: dict[str, Any]) -> Path | None:
        vol = detail.get("volume") or {}
        if attempt["provider"] == "local":
            return self.state.with_name(f"{self.state.name}-volumes") / vol.get("name", "")
        if vol.get("volume_id"):
            return self.root / attempt["provider"] / "volumes" / vol["volume_id"]
        return None

    def _view(self, details: list[dict[str, Any]]) -> Group:
        feed = Table.grid()
        feed.add_column()
        for line in self.feed[-12:]:
            feed.add_row(line)
        return Group(render.jobs_table(details, title="gpuhop demo: 5 jobs on RunPod and AWS (simulated) and this machine"),
                     feed)

    def _summary(self, details: list[dict[str, Any]], ledgers: list[dict[str, Any]]) -> int:
        table = Table(title="what each job cost", header_style="bold")
        for col in ("JOB", "STATUS", "ATTEMPTS", "WHY ATTEMPTS ENDED", "COST", "STEPS EXACTLY ONCE"):
            table.add_column(col)
        ok = True
        for j, d in zip(self.jobs, details, strict=True):
            reasons = ", ".join(a["end_reason"] or a["status"] for a in d["attempts"])
            vol = self._volume_dir(d, d["attempts"][-1]) if d["attempts"] else None
            steps = steps_done(vol) if vol else []
            once = sorted(steps) == list(range(1, j.steps + 1))
            ok = ok and once and d["status"] == "succeeded"
            table.add_row(d["name"], render.status_text(d["status"]), str(len(d["attempts"])), reasons,
                          render.money(d["cost_usd"]), "yes" if once else f"NO ({len(steps)} steps)")
        total = sum(d["cost_usd"] for d in details)
        machines = [e for ledger in ledgers for e in ledger["entries"] if e["kind"] in ("pod", "instance")]
        billed = sum(e["cost_usd"] for e in machines)
        running = [e["owner"] or e["id"] for e in machines if e["running"]]
        self.console.print()
        self.console.print(table)
        self.console.print(
            f"gpuhop accounted ${total:.4f}; the simulated providers billed ${billed:.4f} for {len(machines)} "
            f"machines (gpuhop counts from the launch, EC2 from the boot: a conservative estimate).\n"
            + ("No machine is left running: every one was stopped when its job ended."
               if not running else f"[red]machines still running: {', '.join(running)}[/]")
        )
        return 0 if ok and not running else 1


def demo(
    keep: Annotated[bool, typer.Option("--keep", help="keep the temporary state directory")] = False,
) -> None:
    """See gpuhop work, on simulated providers: placements, preemptions, relaunches, costs."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print("[bold]gpuhop demo[/]: simulated RunPod and AWS, and this machine; no account, nothing billed.")
    demo_ = Demo(console, keep)
    try:
        code = asyncio.run(demo_.run())
    except (ClientError, RuntimeError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)
