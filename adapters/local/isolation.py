"""How local jobs are kept away from the daemon's secrets and from each other.

A local job is an arbitrary program on the daemon's own machine. Run as the daemon's user it can
read the state dir (the API token, `agent.key` that signs every agent's reports, the database)
and every other job's volume. So a job runs either in its image under a container runtime
(it sees its volume and its scratch dir only) or as a uid of its own (one per volume, recorded
so that two volumes never share one; one per attempt without a volume), with its volume and
scratch dir 0700 and the state dir out of its reach.

The choice is a pure function of what the machine offers (`choose`); the probes (`can_switch_
users`, `unreachable_ancestor`, `detect_runtime`) and the uid registry do the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapters.local.settings import Isolation

CONTAINER_SCRATCH = "/gpuhop/scratch"  # where a container job's scratch dir (and HOME) is
RUNTIMES = ("docker", "podman")
# CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SYS_PTRACE:
# what running jobs as other users takes (give volumes away, clean them up, stop the jobs, drop
# to their ids, read their /proc environ to recognise them)
_NEEDED_CAPS = (0, 1, 3, 5, 6, 7, 19)


@dataclass(frozen=True)
class Choice:
    """The isolation in force. `error` set = the configured mode is impossible: launch refuses."""

    mode: Isolation  # "container", "user" or "none" (never "auto")
    runtime: str | None = None  # the container runtime's executable, for "container"
    switch_users: bool = False  # jobs get uids of their own (else: the daemon's own uid)
    reason: str = ""  # why this mode (for "none": why nothing better)
    error: str = ""


def choose(
    wanted: Isolation, runtime: str | None, switch_users: bool, unreachable: str | None
) -> Choice:
    """The isolation to use. `runtime`: a container runtime that answers (or None);
    `switch_users`: the daemon may run jobs as other uids; `unreachable`: why unprivileged
    users cannot reach the volumes dir (None = they can)."""
    user_ok = switch_users and unreachable is None
    why_not_user = (
        "the daemon is neither root nor holds the capabilities to run jobs as other users"
        if not switch_users
        else f"job users cannot reach the volumes dir ({unreachable})"
    )
    if wanted == "none":
        return Choice("none", reason="isolation = none")
    if wanted in ("auto", "container") and runtime is not None:
        return Choice("container", runtime=runtime, switch_users=switch_users, reason=runtime)
    if wanted == "container":
        return Choice("none", error="isolation = container, but no container runtime answers")
    if user_ok:
        return Choice("user", switch_users=True, reason="a uid per volume")
    if wanted == "user":
        return Choice("none", error=f"isolation = user, but {why_not_user}")
    return Choice("none", reason=f"no container runtime answers and {why_not_user}")


def can_switch_users() -> bool:
    """Root, or the capabilities running jobs as other users takes."""
    if os.geteuid() == 0:
        return True
    with contextlib.suppress(OSError, ValueError, StopIteration):
        text = Path("/proc/self/status").read_text()
        line = next(ln for ln in text.splitlines() if ln.startswith("CapEff:"))
        caps = int(line.split()[1], 16)
        return all(caps >> bit & 1 for bit in _NEEDED_CAPS)
    return False


def unreachable_ancestor(path: Path) -> str | None:
    """Why an unprivileged user cannot walk down to `path` ("/root is 0700"); None if it can."""
    for parent in reversed(path.parents):
        try:
            mode = parent.stat().st_mode
        except OSError:
            return None  # not there yet: made by us, with modes we choose
        if not mode & stat.S_IXOTH:
            return f"{parent} is {stat.S_IMODE(mode):04o}"
    return None


async def detect_runtime(configured: str | None, answer_within: float = 15.0) -> str | None:
    """The executable of a container runtime whose engine answers (`<runtime> info` exits 0).
    A CLI without an engine (no daemon, no socket) is not a runtime."""
    for name in [configured] if configured else RUNTIMES:
        exe = shutil.which(name)
        if exe is None:
            continue
        proc = await asyncio.create_subprocess_exec(
            exe, "info", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            code = await asyncio.wait_for(proc.wait(), answer_within)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            continue
        if code == 0:
            return exe
    return None


def container_argv(
    runtime: str,
    name: str,
    image: str,
    command: list[str],
    env_names: list[str],
    literal_env: dict[str, str],
    user: tuple[int, int] | None,
    groups: list[int],
    mounts: list[tuple[Path, str]],
    gpu_indices: list[int],
    workdir: str | None = None,
) -> list[str]:
    """The `<runtime> run` command line of a container job. No value of the job's environment is
    on it (a command line is world-readable): `-e NAME` takes each from the CLI's environment;
    `literal_env` holds gpuhop's own non-secret values (paths inside the container)."""
    argv = [runtime, "run", "--rm", "--name", name, "--label", f"gpuhop.instance={name}",
            "--init", "--network", "host", "--shm-size", "8g",
            "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]
    if user is not None:
        argv += ["--user", f"{user[0]}:{user[1]}"]
        for gid in groups:
            argv += ["--group-add", str(gid)]
    for host, inside in mounts:
        argv += ["--mount", f"type=bind,source={host},target={inside}"]
    if gpu_indices:
        devices = ",".join(str(i) for i in gpu_indices)
        if os.path.basename(runtime).startswith("podman"):
            for i in gpu_indices:
                argv += ["--device", f"nvidia.com/gpu={i}"]
        else:
            argv += ["--gpus", f'"device={devices}"']  # quoted: the list holds commas
    for key in env_names:
        argv += ["-e", key]
    for key, value in literal_env.items():
        argv += ["-e", f"{key}={value}"]
    if workdir:  # the job's working directory (inside a mount): the command starts there
        argv += ["--workdir", workdir]
    return [*argv, "--", image, *command]


class UidRegistry:
    """uids handed to local jobs, recorded in a file so that they stay stable across daemon
    restarts and two volumes never share one. A key's uid is derived from the key (a hash into
    the range) and moved on past uids in use or known to the system's user database."""

    def __init__(self, path: Path, low: int, high: int) -> None:
        self.path = path
        self.low, self.high = low, high

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write(self, table: dict[str, int]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(table, fh, sort_keys=True)
        os.replace(tmp, self.path)

    def get(self, key: str) -> int | None:
        return self._read().get(key)

    def uid_for(self, key: str) -> int:
        """The key's uid, allocated and recorded on first use. Raises LookupError when the
        range is exhausted."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _flock(self.path.with_suffix(".lock")):
            table = self._read()
            if key in table:
                return table[key]
            used = set(table.values())
            size = self.high - self.low + 1
            start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % size
            for step in range(size):
                uid = self.low + (start + step) % size
                if uid in used or _system_uid(uid):
                    continue
                table[key] = uid
                self._write(table)
                return uid
        raise LookupError(f"every uid in {self.low}-{self.high} is in use")

    def release(self, key: str) -> None:
        if not self.path.exists():
            return
        with _flock(self.path.with_suffix(".lock")):
            table = self._read()
            if table.pop(key, None) is not None:
                self._write(table)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _system_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
