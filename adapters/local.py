"""The local provider: run jobs on the machine the daemon itself runs on.

It exists so that a workstation or a single GPU server is one more place to run jobs, priced
(often at zero) and placed like any cloud. The machine is cut into slots: its GPUs (one job may
take several) and a few CPU-only slots. A job is started through the job agent
(`orchestrator/agent.py --daemonize`), which double-forks, so the daemon is never the parent of a
running job: jobs outlive daemon restarts, and a restarted daemon finds them again from files.

Everything the adapter knows lives under `ctx.state_dir / "local"`:

    instances/<name>/request.json    what was launched (offer, GPU indices, price, when)
    instances/<name>/agent.pid       written by the agent after it detached
    instances/<name>/job.pid         the job's pid = its process group and session
    instances/<name>/exit.json       written by the agent when the job ended
    instances/<name>/stop-requested  touched by terminate() before SIGTERM (stopped_by_us)
    instances/<name>/released        terminate() finished; the instance is no longer listed
    instances/<name>/scratch/        working directory, and GPUHOP_VOLUME without a volume
    volumes/<name>/                  a volume: a directory, given to the job as GPUHOP_VOLUME

Directories are 0700 and files 0600: the job's environment (with its per-attempt token) is only
ever in the agent's process environment, never written to a file.

Pids are never trusted alone: an agent is alive only if /proc/<pid>/cmdline names its instance
directory, and a job's process group is killed only if one of its members carries the instance's
marker variable (`GPUHOP_LOCAL_INSTANCE`), so a reused pid is never signalled.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.base import (
    Adapter,
    AdapterContext,
    LogSupport,
    NoCapacity,
    PermanentError,
    RetryLater,
    VolumeSupport,
)
from orchestrator.gpus import canonical_gpu
from orchestrator.models import (
    CapacityType,
    Instance,
    InstanceState,
    LaunchRequest,
    Offer,
    ProviderVolume,
)

log = logging.getLogger(__name__)

PENDING_WINDOW_SECONDS = 10.0  # a launch without agent.pid is PENDING this long, then lost
AGENT_START_SECONDS = 5.0  # how long launch() waits for agent.pid
POLL_SECONDS = 0.05
MARKER_ENV = "GPUHOP_LOCAL_INSTANCE"  # set in every job's env: identifies its processes
CPU_OFFER_ID = "cpu"
VANISHED_REASON = "agent vanished without an exit code"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# never handed from the daemon's own environment to a job: gpuhop's contract variables (set per
# attempt), cloud credentials from the service's EnvironmentFile, and systemd's sockets
_DENY_PREFIXES = ("GPUHOP_", "AWS_", "RUNPOD_", "VAST_", "LAMBDA_")
_DENY_NAMES = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)


class LocalSettings(BaseModel):
    """`[providers.local]`: how much of this machine gpuhop may use, and what it costs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gpu_model: str | None = Field(default=None)
    """The machine's GPU model (any known spelling; stored canonical). None = ask nvidia-smi."""

    gpu_slots: int | None = Field(default=None, ge=0, le=64)
    """GPUs gpuhop may use. None = every GPU nvidia-smi reports (0 when there is none)."""

    cpu_slots: int = Field(default=2, ge=0, le=1024)
    """How many CPU-only jobs (gpu_count = 0) may run at once."""

    price_per_gpu_hour: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    """What one GPU of this machine costs per hour, in USD (power, or an opportunity cost)."""

    cpu_slot_price_per_hour: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    """What one CPU-only slot costs per hour, in USD."""

    region: str = "local"
    """Where this machine's volumes live, as placement sees it."""

    stop_grace_seconds: float = Field(default=10, ge=0, le=3600, allow_inf_nan=False)
    """terminate(): seconds between SIGTERM and SIGKILL, for the job to checkpoint."""

    workdir: Path | None = None
    """Directory local jobs start in (relative paths: to where the daemon was started).
    None = a scratch directory of each instance's own."""

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"{value} is not a directory")
        return path

    @field_validator("gpu_model")
    @classmethod
    def _canonical(cls, value: str | None) -> str | None:
        if value is None:
            return None
        gpu = canonical_gpu(value)
        if gpu is None:
            raise ValueError(f"unknown GPU model {value!r}; see `gpuhop gpus` for the known names")
        return gpu.name

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION_RE.match(value):
            raise ValueError("region must be 1-64 letters, digits, '.', '_' or '-'")
        return value


# --------------------------------------------------------------------------- GPU detection


@dataclass(frozen=True)
class DetectedGpus:
    model: str | None  # canonical name, None when unknown to orchestrator.gpus or no GPU
    count: int  # GPUs of that model
    vram_gb: int  # per GPU, as nvidia-smi reports it (smallest of them)
    indices: tuple[int, ...] = ()  # their nvidia-smi (PCI bus) indices


NO_GPUS = DetectedGpus(None, 0, 0, ())


def parse_nvidia_smi(text: str) -> DetectedGpus:
    """Parse `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader` output.

    One line per GPU, e.g. "NVIDIA GeForce RTX 4090, 24564 MiB". The machine's model is the
    first GPU's; on a mixed machine only the GPUs of that model are counted (their indices are
    kept, so CUDA_VISIBLE_DEVICES names the right ones). An unknown model gives model None."""
    rows: list[tuple[int, str, int]] = []
    for index, line in enumerate(ln.strip() for ln in text.splitlines()):
        if not line:
            continue
        name, _, memory = line.rpartition(",")
        if not name:
            continue
        m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(MiB|GiB|MB|GB)?\s*$", memory, re.IGNORECASE)
        mib = 0.0
        if m:
            mib = float(m.group(1)) * (1024 if (m.group(2) or "").lower() in ("gib", "gb") else 1)
        rows.append((index, name.strip(), round(mib / 1024)))
    if not rows:
        return NO_GPUS
    first = canonical_gpu(rows[0][1])
    key = first.name if first else rows[0][1]
    same = [r for r in rows if ((g := canonical_gpu(r[1])) and g.name == key) or r[1] == key]
    return DetectedGpus(
        first.name if first else None,
        len(same),
        min(r[2] for r in same),
        tuple(r[0] for r in same),
    )


def detect_gpus(timeout: float = 15.0) -> DetectedGpus:
    """Ask nvidia-smi (blocking). No nvidia-smi, or it fails: no GPUs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return NO_GPUS
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("local: nvidia-smi failed (%s); assuming no GPUs", exc)
        return NO_GPUS
    return parse_nvidia_smi(out)


# --------------------------------------------------------------------------- /proc helpers


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_pid(path: Path) -> int | None:
    text = _read_text(path)
    try:
        pid = int(text.strip()) if text else 0
    except ValueError:  # being written
        return None
    return pid if pid > 0 else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live process; None when gone."""
    text = _read_text(Path(f"/proc/{pid}/stat"))
    if not text:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def agent_alive(pid: int | None, inst_dir: Path) -> bool:
    """The agent with this pid runs for this instance (a reused pid is not mistaken for it)."""
    if pid is None or not _alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.fsencode(str(inst_dir)) in args


def group_members(pgid: int, inst_dir: Path) -> list[int]:
    """Live processes in process group `pgid` that belong to this instance (by marker)."""
    marker = os.fsencode(f"{MARKER_ENV}={inst_dir}")
    members: list[int] = []
    found_ours = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _proc_stat(pid)
        if stat is None or stat[1] != pgid or stat[0] in ("Z", "X"):
            continue
        members.append(pid)
        if not found_ours:
            with contextlib.suppress(OSError):
                found_ours = marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return members if found_ours else []


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by the daemon's user only, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _vram(model: str | None) -> int:
    gpu = canonical_gpu(model) if model else None
    return gpu.vram_gb if gpu else 0


def _meminfo_gb() -> int:
    text = _read_text(Path("/proc/meminfo")) or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) // (1024 * 1024) if m else 0


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

    @property
    def holds_slot(self) -> bool:
        return self.state in (InstanceState.RUNNING, InstanceState.PENDING)

    @property
    def gpu_indices(self) -> list[int]:
        return [int(i) for i in self.request.get("gpu_indices", [])]


def _read_json(path: Path) -> dict[str, Any] | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _observe(inst_dir: Path, now: float) -> _Observed | None:
    """Read one instance directory; None when it is released or was never launched."""
    if (inst_dir / "released").exists():
        return None
    request = _read_json(inst_dir / "request.json")
    if request is None:
        return None
    agent_pid = _read_pid(inst_dir / "agent.pid")
    job_pid = _read_pid(inst_dir / "job.pid")
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
    return _Observed(inst_dir.name, inst_dir, request, state, agent_pid, job_pid, exit_info)


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
        self.root = Path(ctx.state_dir).resolve() / "local"
        self.instances_dir = self.root / "instances"
        self.volumes_dir = self.root / "volumes"
        self._gpus: DetectedGpus | None = None
        self._launch_lock = asyncio.Lock()

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
                s.gpu_model, s.gpu_slots, _vram(s.gpu_model), tuple(range(s.gpu_slots))
            )
        else:
            found = await asyncio.to_thread(detect_gpus)
            model = s.gpu_model or found.model
            count = found.count if s.gpu_slots is None else min(s.gpu_slots, found.count)
            if count and model is None:
                log.warning(
                    "local: nvidia-smi reports a GPU model gpuhop does not know; "
                    "set gpu_model in [providers.local] to offer these GPUs"
                )
                count = 0
            inv = (
                DetectedGpus(model, count, _vram(model) or found.vram_gb, found.indices[:count])
                if count and model
                else NO_GPUS
            )
        self._gpus = inv
        return inv

    def _inst_dir(self, name: str) -> Path:
        if not _SAFE_NAME.match(name or ""):
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
        observed = await asyncio.to_thread(self._scan)
        free_gpus, free_cpu = self._free(observed, inv)
        vcpu = os.cpu_count() or 1
        memory_gb = await asyncio.to_thread(_meminfo_gb)
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
        async with self._launch_lock:
            existing = await asyncio.to_thread(_observe_any, inst_dir)
            if existing is not None:
                return self._to_instance(existing)
            inv = await self._inventory()
            observed = await asyncio.to_thread(self._scan)
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
            volume_dir = self._volume_for(req)
            await asyncio.to_thread(self._prepare, req, inst_dir, gpu_indices)
            await self._spawn(req, inst_dir, gpu_indices, volume_dir)
            observed_now = await self._wait_started(inst_dir)
        return self._to_instance(observed_now)

    async def list_instances(self) -> list[Instance]:
        observed = await asyncio.to_thread(self._scan)
        return [self._to_instance(o) for o in observed]

    async def terminate(self, instance_id: str) -> None:
        if not instance_id.startswith(f"{self.ctx.prefix}-"):
            return  # never ours: nothing to stop
        try:
            inst_dir = self._inst_dir(instance_id)
        except PermanentError:
            return
        if not (inst_dir / "request.json").exists() or (inst_dir / "released").exists():
            return
        _write_private(inst_dir / "stop-requested", f"{time.time()}\n")
        # a launch still coming up: give its agent the chance to appear, so it is stopped too
        for _ in _deadline(PENDING_WINDOW_SECONDS):
            if _read_pid(inst_dir / "agent.pid") or (inst_dir / "exit.json").exists():
                break
            launched = float((_read_json(inst_dir / "request.json") or {}).get("launched_at", 0))
            if time.time() - launched >= PENDING_WINDOW_SECONDS:
                break
            await asyncio.sleep(POLL_SECONDS)
        agent_pid = _read_pid(inst_dir / "agent.pid")
        if agent_alive(agent_pid, inst_dir):
            assert agent_pid is not None
            _signal(agent_pid, signal.SIGTERM)  # the agent forwards it to the job's group
            for _ in _deadline(self.settings.stop_grace_seconds):
                if not agent_alive(agent_pid, inst_dir):
                    break
                if (inst_dir / "exit.json").exists() and not await self._job_group(inst_dir):
                    break  # the job is done; the agent may still be reporting its exit
                await asyncio.sleep(POLL_SECONDS * 2)
        await self._kill_all(inst_dir)
        _write_private(inst_dir / "released", f"{time.time()}\n")

    # ---------------------------------------------------------------- launch helpers

    def _volume_for(self, req: LaunchRequest) -> Path | None:
        if req.volume is None:
            return None
        if not _SAFE_NAME.match(req.volume.volume_id or ""):
            raise PermanentError("invalid local volume id", provider=self.name)
        path = self.volumes_dir / req.volume.volume_id
        if not path.is_dir():
            raise PermanentError(
                f"local volume {req.volume.volume_id!r} does not exist (ensure_volume first)",
                provider=self.name,
            )
        return path

    def _prepare(self, req: LaunchRequest, inst_dir: Path, gpu_indices: list[int]) -> None:
        """Write-ahead: the request file exists before the agent is spawned (no secrets in it)."""
        _private_dir(self.root)
        _private_dir(self.instances_dir)
        if inst_dir.exists():  # left by a launch that died before writing request.json
            shutil.rmtree(inst_dir, ignore_errors=True)
        _private_dir(inst_dir)
        _private_dir(inst_dir / "scratch")
        request = {
            "name": req.name,
            "job_id": req.job_id,
            "attempt": req.attempt,
            "offer_id": req.offer.offer_id,
            "gpu_indices": gpu_indices,
            "price_per_hour": self._price(req.offer.offer_id, len(gpu_indices)),
            "volume_id": req.volume.volume_id if req.volume else None,
            "launched_at": time.time(),
        }
        _write_private(inst_dir / "request.json", json.dumps(request))
        logs = Path(self.ctx.logs_dir)
        if not logs.exists():
            _private_dir(logs)
        fd = os.open(self._log_file(req.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)

    def _price(self, offer_id: str, gpus: int) -> float:
        """This machine's own price for the shape (not whatever the request carried)."""
        s = self.settings
        if offer_id == CPU_OFFER_ID:
            return s.cpu_slot_price_per_hour
        return round(gpus * s.price_per_gpu_hour, 6)

    def _job_env(
        self, req: LaunchRequest, inst_dir: Path, gpu_indices: list[int], volume_dir: Path | None
    ) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith(_DENY_PREFIXES) and k not in _DENY_NAMES
        }
        env.update(req.env)
        env.setdefault("GPUHOP_ATTEMPT_NAME", req.name)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # indices as nvidia-smi numbers them
        env["GPUHOP_VOLUME"] = str(volume_dir or (inst_dir / "scratch"))
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_indices)
        env[MARKER_ENV] = str(inst_dir)
        return env

    async def _spawn(
        self, req: LaunchRequest, inst_dir: Path, gpu_indices: list[int], volume_dir: Path | None
    ) -> None:
        log_path = self._log_file(req.name)
        argv = [
            sys.executable,
            "-I",  # the agent is stdlib only: the job's PYTHONPATH must not reach it
            _agent_script(),
            "--daemonize",
            "--dir",
            str(inst_dir),
            "--log",
            str(log_path),
            "--",
            *req.command,
        ]
        env = self._job_env(req, inst_dir, gpu_indices, volume_dir)
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
                    cwd=str(self.settings.workdir or inst_dir / "scratch"),
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
            if _read_pid(inst_dir / "agent.pid") or (inst_dir / "exit.json").exists():
                break
            await asyncio.sleep(POLL_SECONDS)
        observed = await asyncio.to_thread(_observe_any, inst_dir)
        if observed is None:  # pragma: no cover - request.json was just written
            raise RetryLater("local instance disappeared during launch", provider=self.name)
        return observed

    # ---------------------------------------------------------------- terminate helpers

    async def _job_group(self, inst_dir: Path) -> list[int]:
        job_pid = _read_pid(inst_dir / "job.pid")
        if job_pid is None:
            return []
        return await asyncio.to_thread(group_members, job_pid, inst_dir)

    async def _kill_all(self, inst_dir: Path) -> None:
        """SIGKILL what is left: the job's process group first, then the agent."""
        if await self._job_group(inst_dir):
            job_pid = _read_pid(inst_dir / "job.pid")
            assert job_pid is not None
            _signal(job_pid, signal.SIGKILL, group=True)
        agent_pid = _read_pid(inst_dir / "agent.pid")
        # the agent writes exit.json (stopped_by_us) as soon as its job is reaped: let it
        for _ in _deadline(2.0):
            if not agent_alive(agent_pid, inst_dir):
                break
            if (inst_dir / "exit.json").exists():
                break
            await asyncio.sleep(POLL_SECONDS)
        if agent_alive(agent_pid, inst_dir):
            assert agent_pid is not None
            _signal(agent_pid, signal.SIGKILL)
        for _ in _deadline(2.0):
            if not agent_alive(agent_pid, inst_dir) and not await self._job_group(inst_dir):
                break
            await asyncio.sleep(POLL_SECONDS)

    # ---------------------------------------------------------------- volumes and logs

    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        if not _SAFE_NAME.match(name or ""):
            raise PermanentError(f"invalid volume name {name[:80]!r}", provider=self.name)
        if region and region != self.settings.region:
            raise PermanentError(
                f"local volumes live in region {self.settings.region!r}, not {region[:64]!r}",
                provider=self.name,
            )
        _private_dir(self.root)
        _private_dir(self.volumes_dir)
        _private_dir(self.volumes_dir / name)
        return ProviderVolume(
            provider=self.name,
            volume_id=name,
            name=name,
            region=self.settings.region,
            size_gb=size_gb,
        )

    async def delete_volume(self, volume_id: str) -> None:
        if not _SAFE_NAME.match(volume_id or ""):
            return
        await asyncio.to_thread(shutil.rmtree, self.volumes_dir / volume_id, True)

    def log_path(self, instance_name: str) -> Path | None:
        if not _SAFE_NAME.match(instance_name or ""):
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
        inst = Instance(
            provider=self.name,
            instance_id=o.name,
            name=o.name,
            state=o.state,
            region=self.settings.region,
            price_per_hour=float(o.request.get("price_per_hour", 0.0)),
            extra=extra,
        )
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


def _observe_any(inst_dir: Path) -> _Observed | None:
    """Like _observe, but a released instance is reported as TERMINATED (launch idempotency:
    a name that was used and released is not launched again)."""
    if (inst_dir / "released").exists():
        request = _read_json(inst_dir / "request.json") or {}
        return _Observed(
            inst_dir.name, inst_dir, request, InstanceState.TERMINATED, None, None, None, True
        )
    return _observe(inst_dir, time.time())


def _deadline(seconds: float) -> Iterator[None]:
    """Iterate until `seconds` have passed (at least once): `for _ in _deadline(5): ...`."""
    end = time.monotonic() + seconds
    yield None
    while time.monotonic() < end:
        yield None
