"""A fake data center shared by every provider simulator: machines are local processes, volumes
are directories, and a ledger bills both by the second.

A simulator (RunPod, AWS, ...) speaks its provider's wire protocol and keeps its own records of
pods or instances; it asks this runtime to run a machine's command, to deliver a preemption
(SIGTERM, a notice period, then SIGKILL), and to say what everything cost. The image a machine
asks for is ignored: the command runs on this host, in its own session, with `GPUHOP_VOLUME`
pointing at the directory of the volume it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LedgerEntry:
    resource_id: str
    kind: str  # "pod", "instance", "volume"
    price_per_hour: float
    started: float
    stopped: float | None = None
    owner: str = ""  # the name the client gave it

    def cost(self, now: float | None = None) -> float:
        end = self.stopped if self.stopped is not None else (now or time.time())
        return round(max(0.0, end - self.started) * self.price_per_hour / 3600.0, 6)


@dataclass
class Ledger:
    """Per-second billing of every machine and volume the simulator ever ran."""

    entries: dict[str, LedgerEntry] = field(default_factory=dict)

    def start(self, resource_id: str, kind: str, price_per_hour: float, owner: str = "") -> None:
        entry = self.entries.get(resource_id)
        if entry is not None and entry.stopped is None:
            return
        # a resumed machine gets a fresh segment; keep the earlier one's cost
        if entry is not None:
            self.entries[f"{resource_id}#{int(entry.started * 1000)}"] = entry
        self.entries[resource_id] = LedgerEntry(resource_id, kind, price_per_hour, time.time(), owner=owner)

    def stop(self, resource_id: str) -> None:
        entry = self.entries.get(resource_id)
        if entry is not None and entry.stopped is None:
            entry.stopped = time.time()

    def running(self, kind: str | None = None) -> list[LedgerEntry]:
        return [
            e for e in self.entries.values()
            if e.stopped is None and (kind is None or e.kind == kind)
        ]

    def as_json(self) -> dict[str, object]:
        now = time.time()
        rows: list[dict[str, object]] = [
            {
                "id": e.resource_id.split("#")[0],
                "kind": e.kind,
                "owner": e.owner,
                "price_per_hour": e.price_per_hour,
                "started": e.started,
                "stopped": e.stopped,
                "running": e.stopped is None,
                "cost_usd": e.cost(now),
            }
            for e in self.entries.values()
        ]
        total = sum(e.cost(now) for e in self.entries.values())
        return {"entries": rows, "total_usd": round(total, 6)}


@dataclass
class Machine:
    machine_id: str
    proc: asyncio.subprocess.Process
    log_path: Path
    started: float
    exit_code: int | None = None  # set once the process ended (negative = killed by signal)
    killed_by_provider: bool = False


class Runtime:
    """Runs machines as local processes under `root`, one directory per volume."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "volumes").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.machines: dict[str, Machine] = {}
        self.ledger = Ledger()
        self._waiters: set[asyncio.Task[None]] = set()

    def volume_dir(self, volume_id: str) -> Path:
        path = self.root / "volumes" / _safe(volume_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, machine_id: str) -> Path:
        return self.root / "logs" / f"{_safe(machine_id)}.log"

    async def start(
        self,
        machine_id: str,
        command: str,
        env: dict[str, str],
        volume_id: str | None = None,
        workdir: Path | None = None,
    ) -> Machine:
        """Run `command` through /bin/sh in its own session. Idempotent while it runs."""
        current = self.machines.get(machine_id)
        if current is not None and current.exit_code is None:
            return current
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHOP_")}
        full_env.update(env)
        if volume_id is not None:
            full_env["GPUHOP_VOLUME"] = str(self.volume_dir(volume_id))
        log_path = self.log_path(machine_id)
        cwd = workdir or (self.root / "work" / _safe(machine_id))
        cwd.mkdir(parents=True, exist_ok=True)
        # a machine has its own /tmp: nothing a simulated machine writes lands in the host's
        tmp = self.root / "tmp" / _safe(machine_id)
        tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        full_env["TMPDIR"] = str(tmp)
        with open(log_path, "ab") as log:  # noqa: ASYNC230 - opening a local file is instant
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=full_env, cwd=str(cwd), start_new_session=True,
            )
        machine = Machine(machine_id, proc, log_path, time.time())
        self.machines[machine_id] = machine
        task = asyncio.get_running_loop().create_task(self._wait(machine))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)
        return machine

    async def _wait(self, machine: Machine) -> None:
        code = await machine.proc.wait()
        machine.exit_code = code

    def running(self, machine_id: str) -> bool:
        m = self.machines.get(machine_id)
        return m is not None and m.exit_code is None

    def exit_code(self, machine_id: str) -> int | None:
        m = self.machines.get(machine_id)
        return None if m is None else m.exit_code

    def signal(self, machine_id: str, sig: int) -> None:
        """Signal the machine's whole process group. The group outlives its leader (the shell
        may exit on SIGTERM while its children linger), so this does not stop at the leader."""
        m = self.machines.get(machine_id)
        if m is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(m.proc.pid, sig)

    async def preempt(self, machine_id: str, notice_seconds: float) -> None:
        """The provider takes the machine: SIGTERM, `notice_seconds` of grace, then SIGKILL."""
        m = self.machines.get(machine_id)
        if m is None:
            return
        m.killed_by_provider = True
        self.signal(machine_id, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(m.proc.wait()), timeout=max(0.0, notice_seconds))
        self.signal(machine_id, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(m.proc.wait()), timeout=5)

    async def kill(self, machine_id: str, grace: float = 0.0) -> None:
        """Stop the machine now (a user's stop or terminate): every process in its group."""
        m = self.machines.get(machine_id)
        if m is None:
            return
        if grace > 0 and m.exit_code is None:
            self.signal(machine_id, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(m.proc.wait()), timeout=grace)
        self.signal(machine_id, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(m.proc.wait()), timeout=5)

    async def shutdown(self) -> None:
        """Kill every machine; used when a simulator stops so no process is left behind."""
        for machine_id in list(self.machines):
            await self.kill(machine_id)
        for task in list(self._waiters):
            task.cancel()


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:128] or "_"
