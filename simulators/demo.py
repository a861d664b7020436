"""`gpuhop demo`: the whole thing working, with no cloud account and nothing to set up.

It starts the simulated providers in this process, a real `gpuhop serve` daemon in a temporary
state directory, submits a few small training jobs that checkpoint into their volumes, takes
machines away from some of them along the way (a RunPod preemption, a lost local machine, a
RunPod data center running out of GPUs under a job whose checkpoints sync to the simulated S3, so
that it moves elsewhere, priced against waiting, and resumes from its checkpoint there), and
shows the placements, preemptions, moves and relaunches live. It ends with what each job cost and how
many attempts it took, checks every step ran exactly once, and leaves no process behind.

It says something at once (it is the README's first command): its first line comes before the
slow parts (aiohttp is imported only when needed, the simulators only once that line is out),
then one line per step of the start. Everything it prints fits the terminal's width, down to 80
columns: at narrow widths the jobs table drops the job id and age and folds what is long, and
each event is a line of its own above the live table (on a pipe, as it happens).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator import render
from orchestrator.client import Client, ClientError
from simulators.harness import Daemon, steps_done

if TYPE_CHECKING:  # moto loads only when the demo runs, not with every `gpuhop` command
    from simulators.s3 import S3Simulator

TRAIN = Path(__file__).resolve().parent / "demo_train.py"
TERMINAL = {"succeeded", "failed", "cancelled"}
AWS_NOTICE = 8.0  # AWS gives 120 s; the demo is in a hurry
DEMO_BUCKET = "gpuhop-demo-checkpoints"
RUNPOD_NOTICE = 2.0  # SIGTERM to SIGKILL when a pod's host goes away
WIDE = 112  # narrower than this, the tables leave out what matters least and fold the rest
TITLE = "gpuhop demo: 5 jobs on RunPod and AWS (simulated) and this machine"


@dataclass
class Disruption:
    """Take the job's machine away once it has done `after_steps` steps."""

    kind: str  # "preempt" (RunPod's host goes away), "evict" (its data center runs out of `gpu_type` too),
    # "interrupt" (AWS spot warning) or "kill" (the machine dies)
    after_steps: int
    done: bool = False
    gpu_type: str = ""  # "evict": the RunPod GPU type the data center runs out of


@dataclass
class DemoJob:
    spec: dict[str, Any]
    volume: str
    steps: int
    disruption: Disruption | None = None
    job_id: str = ""
    notes: list[str] = field(default_factory=list)
    resumed_said: bool = False


def _job(name: str, steps: int, gpu: list[str] | None, disruption: Disruption | None,
         capacity: str = "auto", providers: list[str] | None = None, sync: str = "none",
         weights_mb: int = 0) -> DemoJob:
    spec: dict[str, Any] = {
        "name": name,
        "image": "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
        "command": ["python3", str(TRAIN), "--steps", str(steps), "--step-seconds", "0.5",
                    *(["--weights-mb", str(weights_mb)] if weights_mb else [])],
        "resources": {"gpu": gpu, "gpu_count": 1} if gpu else {"gpu_count": 0},
        "placement": {"capacity": capacity, **({"providers": providers} if providers else {})},
        "volume": {"name": f"{name}-ckpt", "size_gb": 20, "mount_path": "/workspace", "sync": sync},
        "policy": {"max_relaunches": 5, "checkpoint_interval": 1},
    }
    return DemoJob(spec, f"{name}-ckpt", steps, disruption)


def demo_jobs() -> list[DemoJob]:
    return [
        _job("llama-finetune", 24, ["RTX-4090"], Disruption("preempt", 8), providers=["runpod"]),
        # RunPod has no spot since September 2026: its interruption is a host that goes away
        _job("sdxl-lora", 20, ["RTX-A6000", "L40S"], Disruption("preempt", 6), capacity="on-demand",
             providers=["runpod"]),
        # checkpoints kept in the simulated S3 bucket too ([storage]), restorable anywhere: when its
        # data center runs out of L40S, waiting there (priced by [moving]'s defaults) costs more
        # than moving its 16 MB checkpoint, so it moves to the other data center that has them
        _job("whisper-eval", 16, ["L40S"], Disruption("evict", 5, gpu_type="NVIDIA L40S"), capacity="on-demand",
             providers=["runpod"], sync="object-store", weights_mb=16),
        _job("bert-pretrain", 24, ["A10G"], Disruption("interrupt", 6), capacity="spot", providers=["aws"]),
        _job("tokenize-corpus", 18, None, Disruption("kill", 5), providers=["local"]),
    ]


def _config(runpod_url: str, runpod_key: str, aws_url: str, s3: S3Simulator | None = None) -> str:
    storage = "" if s3 is None else f"""
[storage]
endpoint_url = "{s3.url}"
bucket = "{DEMO_BUCKET}"
access_key_id = "{s3.access_key_id}"
secret_access_key = "{s3.secret_access_key}"
sync_interval_seconds = 2
"""
    return storage + f"""
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



_MOVED = re.compile(r"^(attempt \d+) launched(?: ahead of a reclaim)?: moved from (\S+), which has no capacity: "
                    r"move to (\S+) \$(-?[\d.]+) \(egress .*?\) < expected wait at \S+ ([\d.]+) min .*? = \$([\d.]+)")


def moved_line(message: str) -> str | None:
    """A launch that moved a job away from its volume, said short: where from and to, and moving's
    price against waiting's (the whole arithmetic is in `gpuhop show`). None: not such a launch."""
    m = _MOVED.match(message)
    if m is None:
        return None
    return (f"{m[1]} moves from {m[2]} (no capacity) to {m[3]}: moving (egress, restore, price difference) "
            f"${m[4]} < waiting ~{float(m[5]):.0f} min there ${m[6]}")


class Demo:
    def __init__(self, console: Console, keep: bool) -> None:
        self.console = console
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="gpuhop-demo-"))
        self.state = self.root / "daemon"
        self.daemon: Daemon | None = None
        self.client: Client | None = None
        self.jobs = demo_jobs()
        self.seen_events: dict[str, int] = {}
        self.narrow = console.width < WIDE
        self.s3: S3Simulator | None = None

    @contextlib.contextmanager
    def _step(self, doing: str, done: str) -> Iterator[None]:
        """One step of the start: a spinner while it runs (on a terminal), a line once done."""
        started = time.monotonic()
        with self.console.status(f"{doing}…"):
            yield
        self.console.print(f"  {done} ({time.monotonic() - started:.1f} s)", highlight=False)

    async def run(self) -> int:
        # whatever was started is stopped, in reverse order, however the demo ends (Ctrl-C too)
        started = contextlib.AsyncExitStack()
        started.callback(self._remove_state)
        try:
            with self._step("starting the simulated RunPod", "simulated RunPod: up"):
                from simulators.runpod import RunPodSimulator

                sim = RunPodSimulator(self.root / "runpod", start_delay=1.0, notice_seconds=RUNPOD_NOTICE)
                self.sim_url = await sim.start()
                started.push_async_callback(sim.stop)
            with self._step("starting the simulated AWS (EC2, SQS, EventBridge)", "simulated AWS: up"):
                from simulators.aws import AwsSimulator

                aws = AwsSimulator(self.root / "aws", notice_seconds=AWS_NOTICE, boot_delay=2.0)
                self.aws_url = await aws.start()
                started.push_async_callback(aws.stop)
            with self._step("starting the simulated S3 (checkpoint storage)", "simulated S3: up"):
                from simulators.s3 import S3Simulator

                self.s3 = S3Simulator(buckets=[DEMO_BUCKET])
                await asyncio.to_thread(self.s3.start)
                started.callback(self.s3.stop)
            # the daemon talks to the simulators in this process while it starts and stops: keep
            # this event loop free to answer by waiting on it from a worker thread
            started.push_async_callback(asyncio.to_thread, self._stop_daemon)
            with self._step("starting the gpuhop daemon", "gpuhop daemon: up, with the local provider"):
                await asyncio.to_thread(self._start_daemon, self.sim_url, sim.api_key, self.aws_url)
            return await self._drive()
        finally:
            await started.aclose()

    def _remove_state(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.console.print(f"state kept in {self.root}")

    def _start_daemon(self, runpod_url: str, runpod_key: str, aws_url: str) -> None:
        self.daemon = Daemon(self.state, _config(runpod_url, runpod_key, aws_url, self.s3), log_level="INFO")
        self.daemon.config_path.chmod(0o600)  # it holds the (simulated) RunPod key
        self.client = self.daemon.start()

    def _stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    async def _api(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _sim(self, method: str, url: str, body: Any = None) -> Any:
        """A call to a simulator's admin API; its JSON answer."""
        import aiohttp  # here, not at the top: it takes a while to import, and the demo speaks first

        async with aiohttp.ClientSession() as s, s.request(method, url, json=body) as resp:
            return await resp.json(content_type=None)

    def _say(self, when: str, name: str, text: str) -> None:
        """One line of what happens: its time, the job, and the text folded under itself."""
        line = Table.grid(padding=(0, 1))
        line.add_column(no_wrap=True, width=9)
        line.add_column(no_wrap=True, width=15)
        line.add_column(overflow="fold")
        line.add_row(when, name, text)
        self.console.print(line, highlight=False)

    @staticmethod
    def _now() -> str:
        return time.strftime("%H:%M:%S", time.gmtime())

    async def _drive(self) -> int:
        assert self.client is not None
        c = self.client
        for j in self.jobs:
            created = await self._api(c.submit, j.spec)
            j.job_id = created["id"]
            self._say(self._now(), j.spec["name"], f"submitted as {j.job_id}")
        deadline = time.monotonic() + 240
        # the table stays at the bottom; what happens is printed above it (on a pipe: the events as
        # they come, the table once, at the end)
        with Live(console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                details = [await self._api(c.job, j.job_id) for j in self.jobs]
                self._collect_events(details)
                await self._say_resumed(details)
                await self._disrupt(details)
                live.update(self._table(details))
                if all(d["status"] in TERMINAL for d in details):
                    break
                if time.monotonic() > deadline:
                    self._say(self._now(), "", "the demo took too long; stopping")
                    break
                await asyncio.sleep(0.5)
        ledgers = [await self._sim("GET", f"{url}/_sim/ledger") for url in (self.sim_url, self.aws_url)]
        return self._summary(details, ledgers)

    def _collect_events(self, details: list[dict[str, Any]]) -> None:
        for d in details:
            events = d.get("events", [])
            start = self.seen_events.get(d["id"], 0)
            for e in events[start:]:
                if e["kind"] in ("launched", "running", "preempted", "lost", "succeeded", "failed", "no_capacity",
                                 "interruption", "volume_moved"):
                    msg = moved_line(e["message"]) or (
                        e["message"].split(";")[0] if e["kind"] == "launched" else e["message"])
                    self._say(e["at"][11:19], d["name"], msg[:220])
            self.seen_events[d["id"]] = len(events)

    async def _say_resumed(self, details: list[dict[str, Any]]) -> None:
        """Once a moved job runs at its new place: the step it resumed at, from its own output."""
        assert self.client is not None
        for j, d in zip(self.jobs, details, strict=True):
            moved = [a for a in d["attempts"] if a.get("transfer_cost_usd") is not None]
            if j.resumed_said or not moved or moved[-1]["status"] == "pending" or not moved[-1]["instance_id"]:
                continue
            out = b"".join(await self._api(self.client.logs, d["id"])).decode(errors="replace")
            found = re.search(rf"^attempt {moved[-1]['number']}: starting at step (\d+) of (\d+)", out, re.M)
            if found:
                j.resumed_said = True
                self._say(self._now(), d["name"], f"resumed in {moved[-1]['region']} at step {found[1]} of "
                          f"{found[2]}: its checkpoint restored from object storage, "
                          f"transfer {render.money(moved[-1]['transfer_cost_usd'])}")

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
            iid = attempt["instance_id"]
            if dis.kind == "interrupt":
                answer = await self._sim("POST", f"{self.aws_url}/_sim/instances/{iid}/interrupt")
                # the simulator's own instance-action time: the warning's + its notice, as on EC2
                at = str(((answer or {}).get("notice") or {}).get("time", ""))[11:19] or "?"
                self._say(self._now(), d["name"],
                          f"!! AWS spot interruption warning for {iid}: reclaim at {at}Z ({AWS_NOTICE:.0f} s notice)")
            elif dis.kind == "evict":
                where = attempt["region"]
                await self._sim("POST", f"{self.sim_url}/_sim/capacity",
                                {"count": 0, "data_center": where, "gpu_type": dis.gpu_type})
                await self._sim("POST", f"{self.sim_url}/_sim/pods/{iid}/preempt")
                self._say(self._now(), d["name"],
                          f"!! RunPod data center {where} runs out of {dis.gpu_type.removeprefix('NVIDIA ')} GPUs "
                          f"and the host of pod {iid} goes away ({RUNPOD_NOTICE:.0f} s notice)")
            elif dis.kind == "preempt":
                await self._sim("POST", f"{self.sim_url}/_sim/pods/{iid}/preempt")
                self._say(self._now(), d["name"],
                          f"!! the host of RunPod pod {iid} goes away (SIGTERM, {RUNPOD_NOTICE:.0f} s notice)")
            else:
                job_pid = self.state / "local" / "instances" / attempt["name"] / "job.pid"
                with contextlib.suppress(OSError, ValueError):
                    os.killpg(int(job_pid.read_text()), signal.SIGKILL)
                self._say(self._now(), d["name"], "!! the machine dies under the job (SIGKILL)")

    def _volume_dir(self, detail: dict[str, Any], attempt: dict[str, Any]) -> Path | None:
        vol = detail.get("volume") or {}
        if attempt["provider"] == "local":
            return self.state.with_name(f"{self.state.name}-volumes") / vol.get("name", "")
        if vol.get("volume_id"):
            return self.root / attempt["provider"] / "volumes" / vol["volume_id"]
        return None

    def _new_table(self, title: str) -> Table:
        if self.narrow:  # no vertical rules or edges: their room goes to the columns
            return Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                         min_width=min(len(title), self.console.width))  # the title on one line
        return Table(title=title, header_style="bold")

    def _table(self, details: list[dict[str, Any]]) -> Table:
        """The jobs: `gpuhop jobs`' table where there is room, else the job, its status, its
        attempts, where the last one runs (or why none does yet) and the cost."""
        if not self.narrow:
            return render.jobs_table(details, title=TITLE)
        table = self._new_table(TITLE)
        for col in ("JOB", "STATUS", "ATTEMPTS", "WHERE", "COST"):
            table.add_column(col, justify="right" if col in ("ATTEMPTS", "COST") else "left",
                             no_wrap=col != "WHERE", overflow="fold" if col == "WHERE" else "ellipsis")
        for d in details:
            attempts = d.get("attempts", [])
            place = render.where(attempts[-1]) if attempts else (d.get("message") or "-")
            table.add_row(d["name"], render.status_text(d["status"]), str(len(attempts)), place,
                          render.money(d.get("cost_usd")))
        return table

    def _summary(self, details: list[dict[str, Any]], ledgers: list[dict[str, Any]]) -> int:
        table = self._new_table("what each job cost")
        # narrow: the number of attempts is the length of the list of how they ended
        cols = ["JOB", "STATUS", *([] if self.narrow else ["ATTEMPTS"]), "WHY ATTEMPTS ENDED", "COST",
                "EACH STEP ONCE" if self.narrow else "STEPS EXACTLY ONCE"]
        for col in cols:
            table.add_column(col, no_wrap=col in ("JOB", "STATUS", "COST"))
        ok = True
        for j, d in zip(self.jobs, details, strict=True):
            reasons = ", ".join(a["end_reason"] or a["status"] for a in d["attempts"])
            vol = self._volume_dir(d, d["attempts"][-1]) if d["attempts"] else None
            steps = steps_done(vol) if vol else []
            once = sorted(steps) == list(range(1, j.steps + 1))
            ok = ok and once and d["status"] == "succeeded"
            table.add_row(d["name"], render.status_text(d["status"]),
                          *([] if self.narrow else [str(len(d["attempts"]))]), reasons,
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
    if not console.is_terminal and "COLUMNS" not in os.environ:  # piped: long lines, unless told a width
        console = Console(width=150)
    console.print("[bold]gpuhop demo[/]: starting simulated RunPod, AWS and a local provider…")
    console.print("  no account needed, nothing billed; it takes half a minute or so", highlight=False)
    try:
        code = asyncio.run(Demo(console, keep).run())
    except (ClientError, RuntimeError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)
