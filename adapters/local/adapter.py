"""The local provider's adapter: this machine's GPU and CPU slots as offers, and local jobs
launched through the detached job agent, observed from files, stopped, and billed.

A job is started through the job agent (`orchestrator/agent.py --daemonize`), which
double-forks, so the daemon is never the parent of a running job: jobs outlive daemon
restarts, and a restarted daemon finds them again from files. The agent stays with the daemon's
privileges; the job runs isolated (see isolation.py): in a container, or as a uid of its own.

What the adapter keeps lives under `ctx.state_dir / "local"` (0700, out of every job's reach):

    instances/<name>/request.json    what was launched (offer, GPU indices, price, uid, when)
    instances/<name>/agent.pid       written by the agent after it detached
    instances/<name>/job.pid         the job's pid = its process group and session
    instances/<name>/started_at      when the agent started the job (the bill starts there)
    instances/<name>/exit.json       written by the agent when the job ended
    instances/<name>/stop-requested  touched by terminate() before SIGTERM (stopped_by_us)
    instances/<name>/released        terminate() finished (holds the final bill)
    uids.json                        the uid of each volume and each volume-less attempt

What jobs see lives in `volumes_dir` (default `<state_dir>-volumes`, next to the state dir):

    <volumes_dir>/<volume>/            a volume, GPUHOP_VOLUME, 0700, owned by the job's uid
    <volumes_dir>/.scratch/<name>/     the attempt's scratch dir and HOME (GPUHOP_VOLUME too
                                       without a volume); removed when the attempt is released

The job's environment (with the agent's per-attempt token) is only ever in the agent's process
environment, never in a file, and the agent hands the job none of gpuhop's secrets.

Pids are never trusted alone: an agent is alive only if /proc/<pid>/cmdline names its instance
directory, and a process is killed only if it carries the instance's marker variable
(`GPUHOP_LOCAL_INSTANCE`) or the attempt's own uid, so a reused pid is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from adapters.base import (
    Adapter,
    AdapterContext,
    AdapterError,
    LogSupport,
    NoCapacity,
    PermanentError,
    RetryLater,
    VolumeSupport,
)
from adapters.local.host import (
    MARKER_ENV,
    NO_GPUS,
    DetectedGpus,
    agent_alive,
    alive,
    chown_tree,
    detect_gpus,
    group_members,
    marked_processes,
    meminfo_gb,
    private_dir,
    processes_of_uid,
    read_pid,
    read_text,
    signal_pid,
    vram_of,
    write_private,
)
from adapters.local.isolation import (
    CONTAINER_SCRATCH,
    Choice,
    UidRegistry,
    can_switch_users,
    choose,
    container_argv,
    detect_runtime,
    unreachable_ancestor,
)
from adapters.local.settings import LocalSettings
from orchestrator.models import (
    Bill,
    CapacityType,
    Instance,
    InstanceState,
    LaunchRequest,
    Offer,
    ProviderVolume,
)

log = logging.getLogger("adapters.local")
T = TypeVar("T")

PENDING_WINDOW_SECONDS = 10.0  # a launch without agent.pid is PENDING this long, then lost
AGENT_START_SECONDS = 5.0  # how long launch() waits for agent.pid
POLL_SECONDS = 0.05
CPU_OFFER_ID = "cpu"
VANISHED_REASON = "agent vanished without an exit code"
EXIT_REPORT_MAX_SECONDS = "60"  # the daemon reads exit.json anyway: the agent need not wait long
WORKDIR_NAME = "workdir"  # in a container job's scratch dir: where the agent unpacks its working directory

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# never handed from the daemon's own environment to a job: gpuhop's contract variables (set per
# attempt), cloud credentials from the service's EnvironmentFile, and systemd's sockets
_DENY_PREFIXES = ("GPUHOP_", "AWS_", "RUNPOD_", "VAST_", "LAMBDA_")
_DENY_NAMES = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)
# of gpuhop's variables, those a job sees (the rest are its agent's: token, callback URL, ...)
_JOB_VARS = ("GPUHOP_JOB_ID", "GPUHOP_ATTEMPT", "GPUHOP_VOLUME")


def _agent_script() -> str:
    spec = importlib.util.find_spec("orchestrator.agent")
    if spec is None or spec.origin is None:  # pragma: no cover - broken install
        raise PermanentError("orchestrator/agent.py not found", provider="local")
    return spec.origin


# --------------------------------------------------------------------------- observed state


@dataclass
class _Observed:
    """One instance directory, read."""

    name: str
    inst_dir: Path
    request: dict[str, Any]
    state: InstanceState
    agent_pid: int | None
    job_pid: int | None
    exit: dict[str, Any] | None
    released: bool = False
    started_at: float | None = None

    @property
    def holds_slot(self) -> bool:
        return self.state in (InstanceState.RUNNING, InstanceState.PENDING)

    @property
    def gpu_indices(self) -> list[int]:
        return [int(i) for i in self.request.get("gpu_indices", [])]


def _read_json(path: Path) -> dict[str, Any] | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _started_at(inst_dir: Path, exit_info: dict[str, Any] | None) -> float | None:
    if exit_info is not None and _number(exit_info.get("started_at")) is not None:
        return _number(exit_info["started_at"])
    text = read_text(inst_dir / "started_at")
    try:
        return float(text) if text else None
    except ValueError:  # being written
        return None


def _observe(inst_dir: Path, now: float) -> _Observed | None:
    """Read one instance directory; None when it is released or was never launched."""
    if (inst_dir / "released").exists():
        return None
    request = _read_json(inst_dir / "request.json")
    if request is None:
        return None
    agent_pid = read_pid(inst_dir / "agent.pid")
    job_pid = read_pid(inst_dir / "job.pid")
    exit_info = _read_json(inst_dir / "exit.json")
    if exit_info is None:
        if agent_alive(agent_pid, inst_dir):
            state = InstanceState.RUNNING
        else:
            exit_info = _read_json(inst_dir / "exit.json")  # it may have just finished
            if exit_info is None:
                launched = float(request.get("launched_at", 0))
                recent = now - launched < PENDING_WINDOW_SECONDS
                state = (
                    InstanceState.PENDING
                    if agent_pid is None and recent
                    else InstanceState.TERMINATED
                )
    if exit_info is not None:
        state = InstanceState.EXITED
    return _Observed(
        inst_dir.name, inst_dir, request, state, agent_pid, job_pid, exit_info,
        started_at=_started_at(inst_dir, exit_info),
    )


def _observe_any(inst_dir: Path) -> _Observed | None:
    """Like _observe, but a released instance is reported as TERMINATED (launch idempotency:
    a name that was used and released is not launched again)."""
    if (inst_dir / "released").exists():
        request = _read_json(inst_dir / "request.json") or {}
        return _Observed(
            inst_dir.name, inst_dir, request, InstanceState.TERMINATED, None, None, None, True
        )
    return _observe(inst_dir, time.time())


def bill_of(price_per_hour: float, started_at: float | None, ended_at: float | None,
            now: float) -> Bill | None:
    """The slot's charge from the agent's own times: price x (end, or now, - start)."""
    if started_at is None:
        return None
    end = now if ended_at is None else ended_at
    return Bill(started_at, ended_at, price_per_hour * max(0.0, end - started_at) / 3600)


def _deadline(seconds: float) -> Iterator[None]:
    """Iterate until `seconds` have passed (at least once): `for _ in _deadline(5): ...`."""
    end = time.monotonic() + seconds
    yield None
    while time.monotonic() < end:
        yield None


# --------------------------------------------------------------------------- the adapter


class LocalAdapter(Adapter, VolumeSupport, LogSupport):
    """This machine as a provider: GPU slots and CPU slots, jobs run by the detached agent."""

    name = "local"
    remote = False  # the daemon reads its jobs' exit codes from the instance directories
    Settings = LocalSettings

    def __init__(self, settings: LocalSettings, ctx: AdapterContext) -> None:
        super().__init__(settings, ctx)
        self.settings: LocalSettings = settings
        # resolved: the agent's command line names its directory, and a restarted daemon must
        # spell it the same way to recognise its agents
        self.state_dir = Path(ctx.state_dir).resolve()
        self.root = self.state_dir / "local"
        self.instances_dir = self.root / "instances"
        self.legacy_volumes_dir = self.root / "volumes"  # before volumes left the state dir
        self.volumes_dir = settings.volumes_dir or self.state_dir.with_name(
            f"{self.state_dir.name}-volumes"
        )
        self.scratch_dir = self.volumes_dir / ".scratch"
        self.uids = UidRegistry(self.root / "uids.json", *settings.job_uid_range)
        self._gpus: DetectedGpus | None = None
        self._choice: Choice | None = None
        self._launch_lock = asyncio.Lock()
        self._choice_lock = asyncio.Lock()
        # blocking file and /proc work runs here, awaited to its end; never the loop's default
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpuhop-local")

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---------------------------------------------------------------- isolation

    async def isolation(self) -> Choice:
        """The isolation in force, decided once (a container runtime is asked to answer)."""
        if self._choice is None:
            async with self._choice_lock:
                if self._choice is None:
                    s = self.settings
                    runtime = None
                    if s.isolation in ("auto", "container"):
                        runtime = await detect_runtime(s.container_runtime)
                    choice = choose(
                        s.isolation,
                        runtime,
                        can_switch_users(),
                        await self._io(unreachable_ancestor, self.volumes_dir),
                    )
                    if choice.mode != "none":
                        await self._io(self._tighten_state_dir)
                    self._choice = choice
        return self._choice

    def _tighten_state_dir(self) -> None:
        with contextlib.suppress(OSError):
            mode = self.state_dir.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(self.state_dir, 0o700)
                log.warning(
                    "local: the state dir %s was %04o; made it 0700 so local jobs cannot read it",
                    self.state_dir, mode,
                )

    async def verify(self) -> str:
        """No credentials here: say how local jobs would run (the isolation check is the one a
        configuration can fail)."""
        choice = await self.isolation()
        if choice.error:
            raise AdapterError(choice.error, provider=self.name)
        if choice.mode == "none":
            return f"local jobs NOT isolated ({choice.reason})"
        return f"local jobs isolated: {choice.mode} ({choice.reason})"

    async def start(self) -> None:
        choice = await self.isolation()
        if choice.error:
            log.error("local: %s; local launches are refused until that is fixed", choice.error)
        elif choice.mode == "none":
            log.warning(
                "local: local jobs are NOT isolated (%s): they run as the daemon's own user and "
                "can read its state dir (API token, agent.key, database) and every local volume",
                choice.reason,
            )
        else:
            log.info("local: local jobs run isolated (%s: %s)", choice.mode, choice.reason)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)

    # ---------------------------------------------------------------- machine shape

    async def _inventory(self) -> DetectedGpus:
        """The GPUs gpuhop may hand out: configured, or detected once (nvidia-smi)."""
        if self._gpus is not None:
            return self._gpus
        s = self.settings
        if s.gpu_slots == 0:
            inv = NO_GPUS
        elif s.gpu_slots is not None and s.gpu_model is not None:  # fully configured
            inv = DetectedGpus(
                s.gpu_model, s.gpu_slots, vram_of(s.gpu_model), tuple(range(s.gpu_slots))
            )
        else:
            found = await self._io(detect_gpus)
            model = s.gpu_model or found.model
            count = found.count if s.gpu_slots is None else min(s.gpu_slots, found.count)
            if count and model is None:
                log.warning(
                    "local: nvidia-smi reports a GPU model gpuhop does not know; "
                    "set gpu_model in [providers.local] to offer these GPUs"
                )
                count = 0
            inv = (
                DetectedGpus(model, count, vram_of(model) or found.vram_gb, found.indices[:count])
                if count and model
                else NO_GPUS
            )
        self._gpus = inv
        return inv

    def _inst_dir(self, name: str) -> Path:
        if not _SAFE_NAME.fullmatch(name or ""):
            raise PermanentError(f"invalid local instance name {name[:80]!r}", provider=self.name)
        return self.instances_dir / name

    def _scan(self) -> list[_Observed]:
        """Every instance directory of ours that is not released (blocking; small reads)."""
        if not self.instances_dir.is_dir():
            return []
        now = time.time()
        prefix = f"{self.ctx.prefix}-"
        out: list[_Observed] = []
        for entry in sorted(os.scandir(self.instances_dir), key=lambda e: e.name):
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            observed = _observe(Path(entry.path), now)
            if observed is not None:
                out.append(observed)
        return out

    def _free(self, observed: list[_Observed], inv: DetectedGpus) -> tuple[list[int], int]:
        """(free GPU indices, free CPU slots) given what holds a slot now."""
        held = [o for o in observed if o.holds_slot]
        used_gpus = {i for o in held for i in o.gpu_indices}
        cpu_used = sum(1 for o in held if o.request.get("offer_id") == CPU_OFFER_ID)
        free_gpus = [i for i in inv.indices if i not in used_gpus]
        return free_gpus, max(0, self.settings.cpu_slots - cpu_used)

    # ---------------------------------------------------------------- the four verbs

    async def offers(self) -> list[Offer]:
        inv = await self._inventory()
        observed = await self._io(self._scan)
        free_gpus, free_cpu = self._free(observed, inv)
        vcpu = os.cpu_count() or 1
        memory_gb = await self._io(meminfo_gb)
        s = self.settings
        offers: list[Offer] = []
        for n in range(1, len(free_gpus) + 1):
            offers.append(
                Offer(
                    provider=self.name,
                    offer_id=f"gpu:{n}",
                    region=s.region,
                    gpu=inv.model,
                    gpu_count=n,
                    vram_gb=inv.vram_gb,
                    vcpu=vcpu,
                    memory_gb=memory_gb,
                    disk_gb=0,  # not limited
                    capacity=CapacityType.ON_DEMAND,
                    price_per_hour=self._price(f"gpu:{n}", n),
                    available=len(free_gpus) // n,
                    supports_volumes=True,
                )
            )
        if free_cpu > 0:
            offers.append(
                Offer(
                    provider=self.name,
                    offer_id=CPU_OFFER_ID,
                    region=s.region,
                    gpu=None,
                    gpu_count=0,
                    vram_gb=0,
                    vcpu=vcpu,
                    memory_gb=memory_gb,
                    disk_gb=0,
                    capacity=CapacityType.ON_DEMAND,
                    price_per_hour=self._price(CPU_OFFER_ID, 0),
                    available=free_cpu,
                    supports_volumes=True,
                )
            )
        return offers

    async def launch(self, req: LaunchRequest) -> Instance:
        if not req.name.startswith(f"{self.ctx.prefix}-"):
            # list_instances() and the orphan reaper only see names with our prefix
            raise PermanentError(
                f"instance name {req.name[:80]!r} lacks the prefix {self.ctx.prefix!r}",
                provider=self.name,
            )
        inst_dir = self._inst_dir(req.name)
        choice = await self.isolation()
        async with self._launch_lock:
            existing = await self._io(_observe_any, inst_dir)
            if existing is not None:
                return self._to_instance(existing)
            if choice.error:
                raise PermanentError(choice.error, provider=self.name)
            if choice.mode == "container" and (not req.image or req.image.startswith("-")):
                raise PermanentError("a container job needs an image", provider=self.name)
            inv = await self._inventory()
            observed = await self._io(self._scan)
            free_gpus, free_cpu = self._free(observed, inv)
            offer_id = req.offer.offer_id
            if offer_id == CPU_OFFER_ID:
                if free_cpu < 1:
                    raise NoCapacity("no free CPU slot on this machine", provider=self.name)
                gpu_indices: list[int] = []
            else:
                m = re.fullmatch(r"gpu:(\d{1,3})", offer_id)
                if not m or int(m.group(1)) < 1:
                    raise PermanentError(
                        f"unknown local offer {offer_id[:40]!r}", provider=self.name
                    )
                wanted = int(m.group(1))
                if wanted > len(free_gpus):
                    raise NoCapacity(
                        f"{wanted} GPU(s) asked, {len(free_gpus)} free on this machine",
                        provider=self.name,
                    )
                gpu_indices = free_gpus[:wanted]
            volume_dir = await self._io(self._volume_for, req)
            ids = await self._io(self._ids_for, req, choice)
            await self._io(self._prepare, req, inst_dir, gpu_indices, choice, ids, volume_dir)
            await self._spawn(req, inst_dir, gpu_indices, volume_dir, choice, ids)
            observed_now = await self._wait_started(inst_dir)
        return self._to_instance(observed_now)

    async def list_instances(self) -> list[Instance]:
        observed = await self._io(self._scan)
        return [self._to_instance(o) for o in observed]

    async def terminate(self, instance_id: str) -> Bill | None:
        if not instance_id.startswith(f"{self.ctx.prefix}-"):
            return None  # never ours: nothing to stop
        try:
            inst_dir = self._inst_dir(instance_id)
        except PermanentError:
            return None
        request = await self._io(_read_json, inst_dir / "request.json")
        if request is None:
            return None
        if (inst_dir / "released").exists():
            return await self._io(self._released_bill, inst_dir, request)
        write_private(inst_dir / "stop-requested", f"{time.time()}\n")
        # a launch still coming up: give its agent the chance to appear, so it is stopped too
        for _ in _deadline(PENDING_WINDOW_SECONDS):
            if read_pid(inst_dir / "agent.pid") or (inst_dir / "exit.json").exists():
                break
            if time.time() - float(request.get("launched_at", 0)) >= PENDING_WINDOW_SECONDS:
                break
            await asyncio.sleep(POLL_SECONDS)
        agent_pid = read_pid(inst_dir / "agent.pid")
        if agent_alive(agent_pid, inst_dir):
            assert agent_pid is not None
            signal_pid(agent_pid, signal.SIGTERM)  # the agent forwards it to the job's group
            for _ in _deadline(self.settings.stop_grace_seconds):
                if not agent_alive(agent_pid, inst_dir):
                    break
                if (inst_dir / "exit.json").exists() and not await self._job_group(inst_dir):
                    break  # the job is done; the agent may still be reporting its exit
                await asyncio.sleep(POLL_SECONDS * 2)
        await self._kill_all(inst_dir, request)
        # every process is gone: billing stopped, the bill is final
        observed = await self._io(_observe, inst_dir, time.time())
        exit_info = observed.exit if observed else None
        launched = float(request.get("launched_at", time.time()))
        started = observed.started_at if observed and observed.started_at else None
        ended = _number(exit_info.get("ended_at")) if exit_info else None
        if started is None:  # the job never started: nothing was billed
            started, ended = launched, launched
        end = ended if ended is not None else time.time()
        bill = bill_of(float(request.get("price_per_hour", 0.0)), started, end, end)
        await self._io(self._release, inst_dir, request, bill)
        return bill

    # ---------------------------------------------------------------- launch helpers

    def _volume_path(self, volume_id: str) -> Path:
        """A volume's directory; one left in the state dir by an older gpuhop is moved out."""
        path = self.volumes_dir / volume_id
        legacy = self.legacy_volumes_dir / volume_id
        if not path.exists() and legacy.is_dir():
            self._volumes_root()
            shutil.move(str(legacy), str(path))
            log.info("local: moved volume %s out of the state dir to %s", volume_id, path)
        return path

    def _volumes_root(self) -> None:
        """volumes_dir: traversable (not listable) by job users when they reach it directly."""
        mode = 0o711 if self._choice is not None and self._choice.mode == "user" else 0o700
        self.volumes_dir.mkdir(mode=mode, parents=True, exist_ok=True)
        os.chmod(self.volumes_dir, mode)
        self.scratch_dir.mkdir(mode=mode, exist_ok=True)
        os.chmod(self.scratch_dir, mode)

    def _volume_for(self, req: LaunchRequest) -> Path | None:
        if req.volume is None:
            return None
        if not _SAFE_NAME.fullmatch(req.volume.volume_id or ""):
            raise PermanentError("invalid local volume id", provider=self.name)
        path = self._volume_path(req.volume.volume_id)
        if not path.is_dir():
            raise PermanentError(
                f"local volume {req.volume.volume_id!r} does not exist (ensure_volume first)",
                provider=self.name,
            )
        return path

    def _ids_for(self, req: LaunchRequest, choice: Choice) -> tuple[int, int] | None:
        """uid/gid the job runs as: its volume's, or its attempt's own; None = the daemon's."""
        if choice.mode == "none":
            return None
        if not choice.switch_users:  # a container as the daemon's user: the mounts isolate
            return os.getuid(), os.getgid()
        key = f"volume:{req.volume.volume_id}" if req.volume else f"attempt:{req.name}"
        try:
            uid = self.uids.uid_for(key)
        except LookupError as exc:
            raise NoCapacity(str(exc), provider=self.name) from None
        return uid, uid

    def _prepare(
        self,
        req: LaunchRequest,
        inst_dir: Path,
        gpu_indices: list[int],
        choice: Choice,
        ids: tuple[int, int] | None,
        volume_dir: Path | None,
    ) -> None:
        """Write-ahead: the request file exists before the agent is spawned (no secrets in it);
        the job's scratch dir and volume belong to the job's uid, 0700."""
        private_dir(self.root)
        private_dir(self.instances_dir)
        if inst_dir.exists():  # left by a launch that died before writing request.json
            shutil.rmtree(inst_dir, ignore_errors=True)
        private_dir(inst_dir)
        self._volumes_root()
        scratch = self.scratch_dir / req.name
        shutil.rmtree(scratch, ignore_errors=True)
        private_dir(scratch)
        give = ids if choice.switch_users else None
        if give is not None:
            os.chown(scratch, *give)
            if volume_dir is not None and volume_dir.stat().st_uid != give[0]:
                chown_tree(volume_dir, *give)
        if volume_dir is not None:
            os.chmod(volume_dir, 0o700)
        request = {
            "name": req.name,
            "job_id": req.job_id,
            "attempt": req.attempt,
            "offer_id": req.offer.offer_id,
            "gpu_indices": gpu_indices,
            "price_per_hour": self._price(req.offer.offer_id, len(gpu_indices)),
            "volume_id": req.volume.volume_id if req.volume else None,
            "isolation": choice.mode,
            "uid": give[0] if give else None,
            "runtime": choice.runtime if choice.mode == "container" else None,
            "scratch": str(scratch),
            "launched_at": time.time(),
        }
        write_private(inst_dir / "request.json", json.dumps(request))
        logs = Path(self.ctx.logs_dir)
        if not logs.exists():
            private_dir(logs)
        fd = os.open(self._log_file(req.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)

    def _price(self, offer_id: str, gpus: int) -> float:
        """This machine's own price for the shape (not whatever the request carried)."""
        s = self.settings
        if offer_id == CPU_OFFER_ID:
            return s.cpu_slot_price_per_hour
        return round(gpus * s.price_per_gpu_hour, 6)

    def _agent_env(
        self,
        req: LaunchRequest,
        inst_dir: Path,
        gpu_indices: list[int],
        volume_dir: Path | None,
        choice: Choice,
    ) -> dict[str, str]:
        """The agent's environment; the agent hands the job only part of it (not the token)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith(_DENY_PREFIXES) and k not in _DENY_NAMES
        }
        env.update(req.env)
        scratch = self.scratch_dir / req.name
        env.setdefault("GPUHOP_ATTEMPT_NAME", req.name)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # indices as nvidia-smi numbers them
        env["GPUHOP_VOLUME"] = str(volume_dir or scratch)  # the agent writes its marker there
        env["GPUHOP_EXIT_REPORT_MAX"] = EXIT_REPORT_MAX_SECONDS
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_indices)
        env[MARKER_ENV] = str(inst_dir)
        if choice.mode == "user":
            env["HOME"] = env["TMPDIR"] = str(scratch)
        if choice.mode == "container" and "GPUHOP_WORKDIR" in req.env:
            env["GPUHOP_WORKDIR_PATH"] = str(scratch / WORKDIR_NAME)  # mounted: the container sees it
        return env

    def _agent_argv(
        self,
        req: LaunchRequest,
        inst_dir: Path,
        gpu_indices: list[int],
        volume_dir: Path | None,
        choice: Choice,
        ids: tuple[int, int] | None,
    ) -> list[str]:
        argv = [
            sys.executable,
            "-I",  # the agent is stdlib only: the job's PYTHONPATH must not reach it
            _agent_script(),
            "--daemonize",
            "--dir",
            str(inst_dir),
            "--log",
            str(self._log_file(req.name)),
        ]
        groups = ",".join(str(g) for g in self.settings.job_groups)
        command = list(req.command)
        if choice.mode == "user" and ids is not None:
            argv += ["--user", f"{ids[0]}:{ids[1]}:{groups}"]
        elif choice.mode == "container" and choice.runtime and ids is not None:
            argv += ["--marker-user", f"{ids[0]}:{ids[1]}"]
            scratch = self.scratch_dir / req.name
            mounts = [(scratch, CONTAINER_SCRATCH)]
            if volume_dir is not None:
                mounts.append((volume_dir, req.mount_path))
            job_names = sorted(
                k for k in req.env if not k.startswith("GPUHOP_") or k in _JOB_VARS
            )
            literal = {
                "GPUHOP_VOLUME": req.mount_path if volume_dir is not None else CONTAINER_SCRATCH,
                "HOME": CONTAINER_SCRATCH,
            }
            command = container_argv(
                choice.runtime, req.name, req.image, command,
                [k for k in job_names if k not in literal], literal,
                ids, self.settings.job_groups if choice.switch_users else [],
                mounts, gpu_indices,
                f"{CONTAINER_SCRATCH}/{WORKDIR_NAME}" if "GPUHOP_WORKDIR" in req.env else None,
            )
        return [*argv, "--", *command]

    async def _spawn(
        self,
        req: LaunchRequest,
        inst_dir: Path,
        gpu_indices: list[int],
        volume_dir: Path | None,
        choice: Choice,
        ids: tuple[int, int] | None,
    ) -> None:
        log_path = self._log_file(req.name)
        argv = self._agent_argv(req, inst_dir, gpu_indices, volume_dir, choice, ids)
        env = self._agent_env(req, inst_dir, gpu_indices, volume_dir, choice)
        cwd = self.scratch_dir / req.name
        if choice.mode != "container" and self.settings.workdir:
            cwd = self.settings.workdir
        try:
            # the agent's own messages (a traceback) land in the job's log
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                    env=env,
                    cwd=str(cwd),
                    start_new_session=True,
                )
            finally:
                os.close(fd)
            code = await asyncio.wait_for(proc.wait(), timeout=AGENT_START_SECONDS * 2)
        except (OSError, TimeoutError) as exc:
            shutil.rmtree(inst_dir, ignore_errors=True)
            raise RetryLater(
                f"could not start the local agent: {exc}", provider=self.name
            ) from None
        if code != 0:  # the agent's first process exits 0 once it has detached
            shutil.rmtree(inst_dir, ignore_errors=True)
            raise RetryLater(f"the local agent failed to detach (exit {code})", provider=self.name)

    async def _wait_started(self, inst_dir: Path) -> _Observed:
        for _ in _deadline(AGENT_START_SECONDS):
            if read_pid(inst_dir / "agent.pid") or (inst_dir / "exit.json").exists():
                break
            await asyncio.sleep(POLL_SECONDS)
        observed = await self._io(_observe_any, inst_dir)
        if observed is None:  # pragma: no cover - request.json was just written
            raise RetryLater("local instance disappeared during launch", provider=self.name)
        return observed

    # ---------------------------------------------------------------- terminate helpers

    async def _job_group(self, inst_dir: Path) -> list[int]:
        job_pid = read_pid(inst_dir / "job.pid")
        if job_pid is None:
            return []
        return await self._io(group_members, job_pid, inst_dir)

    def _stragglers(self, inst_dir: Path, request: dict[str, Any]) -> list[int]:
        """Processes of the attempt outside its group: by marker, and by its own uid (an
        attempt without a volume has a uid nobody else uses)."""
        pids = set(marked_processes(inst_dir))
        uid = request.get("uid")
        if isinstance(uid, int) and request.get("volume_id") is None and uid != os.getuid():
            pids.update(processes_of_uid(uid))
        agent_pid = read_pid(inst_dir / "agent.pid")
        pids.discard(agent_pid or 0)
        return sorted(pids)

    async def _kill_all(self, inst_dir: Path, request: dict[str, Any]) -> None:
        """SIGKILL what is left: the job's process group, its stragglers, then the agent."""
        if await self._job_group(inst_dir):
            job_pid = read_pid(inst_dir / "job.pid")
            assert job_pid is not None
            signal_pid(job_pid, signal.SIGKILL, group=True)
        for pid in await self._io(self._stragglers, inst_dir, request):
            signal_pid(pid, signal.SIGKILL)
        if request.get("runtime"):
            await self._remove_container(str(request["runtime"]), str(request.get("name", "")))
        agent_pid = read_pid(inst_dir / "agent.pid")
        # the agent writes exit.json (stopped_by_us) as soon as its job is reaped: let it
        for _ in _deadline(2.0):
            if not agent_alive(agent_pid, inst_dir):
                break
            if (inst_dir / "exit.json").exists():
                break
            await asyncio.sleep(POLL_SECONDS)
        if agent_alive(agent_pid, inst_dir):
            assert agent_pid is not None
            signal_pid(agent_pid, signal.SIGKILL)
        for _ in _deadline(5.0):
            if (
                not agent_alive(agent_pid, inst_dir)
                and not await self._job_group(inst_dir)
                and not await self._io(self._stragglers, inst_dir, request)
            ):
                break
            await asyncio.sleep(POLL_SECONDS)

    async def _remove_container(self, runtime: str, name: str) -> None:
        """`<runtime> rm -f <name>`: a container outlives a killed CLI. Bounded; already gone
        is fine."""
        if not _SAFE_NAME.fullmatch(name):
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                runtime, "rm", "-f", name, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            log.warning("local: could not run %s rm for %s: %s", runtime, name, exc)
            return
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("local: %s rm -f %s did not finish within 60 s", runtime, name)

    def _release(self, inst_dir: Path, request: dict[str, Any], bill: Bill | None) -> None:
        """The attempt is over: drop its scratch dir and its own uid, record the final bill."""
        scratch = request.get("scratch")
        if isinstance(scratch, str) and Path(scratch).parent == self.scratch_dir:
            shutil.rmtree(scratch, ignore_errors=True)
        if request.get("volume_id") is None and request.get("uid") is not None:
            self.uids.release(f"attempt:{inst_dir.name}")
        record: dict[str, Any] = {"released_at": time.time()}
        if bill is not None:
            record.update(started_at=bill.started_at, ended_at=bill.ended_at, cost_usd=bill.cost_usd)
        write_private(inst_dir / "released", json.dumps(record))

    def _released_bill(self, inst_dir: Path, request: dict[str, Any]) -> Bill | None:
        record = _read_json(inst_dir / "released") or {}
        started, ended = _number(record.get("started_at")), _number(record.get("ended_at"))
        cost = _number(record.get("cost_usd"))
        if started is None or ended is None or cost is None:
            return None  # released by an older gpuhop: the bill is not known any more
        return Bill(started, ended, cost)

    # ---------------------------------------------------------------- volumes and logs

    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        if not _SAFE_NAME.fullmatch(name or ""):
            raise PermanentError(f"invalid volume name {name[:80]!r}", provider=self.name)
        if region and region != self.settings.region:
            raise PermanentError(
                f"local volumes live in region {self.settings.region!r}, not {region[:64]!r}",
                provider=self.name,
            )
        choice = await self.isolation()

        def make() -> None:
            self._volumes_root()
            path = self._volume_path(name)
            path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
            if choice.switch_users:
                uid = self.uids.uid_for(f"volume:{name}")
                if path.stat().st_uid != uid:
                    chown_tree(path, uid, uid)

        try:
            await self._io(make)
        except LookupError as exc:
            raise NoCapacity(str(exc), provider=self.name) from None
        return ProviderVolume(
            provider=self.name,
            volume_id=name,
            name=name,
            region=self.settings.region,
            size_gb=size_gb,
        )

    async def delete_volume(self, volume_id: str) -> None:
        if not _SAFE_NAME.fullmatch(volume_id or ""):
            return

        def delete() -> None:
            shutil.rmtree(self.volumes_dir / volume_id, ignore_errors=True)
            shutil.rmtree(self.legacy_volumes_dir / volume_id, ignore_errors=True)
            if self.root.is_dir():
                self.uids.release(f"volume:{volume_id}")

        await self._io(delete)

    def volume_dir(self, volume_id: str) -> Path:
        """Where a local volume lives on this machine (for tools and tests)."""
        return self.volumes_dir / volume_id

    def log_path(self, instance_name: str) -> Path | None:
        if not _SAFE_NAME.fullmatch(instance_name or ""):
            return None
        path = self._log_file(instance_name)
        return path if path.exists() else None

    def _log_file(self, name: str) -> Path:
        return Path(self.ctx.logs_dir) / f"{name}.log"

    # ---------------------------------------------------------------- normalization

    def _to_instance(self, o: _Observed) -> Instance:
        extra = {"offer_id": str(o.request.get("offer_id", ""))}
        extra["cuda_visible_devices"] = ",".join(str(i) for i in o.gpu_indices)
        if o.agent_pid:
            extra["agent_pid"] = str(o.agent_pid)
        if o.job_pid:
            extra["job_pid"] = str(o.job_pid)
        if o.request.get("isolation"):
            extra["isolation"] = str(o.request["isolation"])
        price = float(o.request.get("price_per_hour", 0.0))
        inst = Instance(
            provider=self.name,
            instance_id=o.name,
            name=o.name,
            state=o.state,
            region=self.settings.region,
            price_per_hour=price,
            extra=extra,
        )
        if not o.released:
            ended = _number(o.exit.get("ended_at")) if o.exit else None
            inst.bill = bill_of(price, o.started_at, ended, time.time())
        if o.state is InstanceState.EXITED and o.exit is not None:
            code, sig = o.exit.get("exit_code"), o.exit.get("signal")
            inst.exit_code = code if isinstance(code, int) else None
            inst.exit_signal = sig if isinstance(sig, int) else None
            inst.stopped_by_us = bool(o.exit.get("stopped_by_us"))
            if inst.stopped_by_us:
                inst.reason = "stopped by gpuhop"
            elif inst.exit_signal is not None:
                inst.reason = f"killed by signal {inst.exit_signal}"
            else:
                inst.reason = f"exited with code {inst.exit_code}"
            if o.exit.get("error"):
                inst.reason += f": {str(o.exit['error'])[:200]}"
        elif o.state is InstanceState.TERMINATED:
            if o.released:
                inst.reason = "terminated by gpuhop"
            else:
                inst.reason = VANISHED_REASON if o.agent_pid else "the agent never started"
        elif o.state is InstanceState.PENDING:
            inst.reason = "agent starting"
        return inst


__all__ = ["CPU_OFFER_ID", "VANISHED_REASON", "LocalAdapter", "alive", "bill_of"]
