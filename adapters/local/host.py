"""What the local adapter reads from and does to this machine, below the adapter: its GPUs
(nvidia-smi), its processes (/proc, read so that a reused pid is never mistaken for a job of
ours), and private files. Blocking and small; the adapter calls it from threads or briefly."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.gpus import canonical_gpu

log = logging.getLogger("adapters.local")

MARKER_ENV = "GPUHOP_LOCAL_INSTANCE"  # set in every job's env: identifies its processes


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


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def read_pid(path: Path) -> int | None:
    text = read_text(path)
    try:
        pid = int(text.strip()) if text else 0
    except ValueError:  # being written
        return None
    return pid if pid > 0 else None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live process; None when gone."""
    text = read_text(Path(f"/proc/{pid}/stat"))
    if not text:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2])
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def agent_alive(pid: int | None, inst_dir: Path) -> bool:
    """The agent with this pid runs for this instance (a reused pid is not mistaken for it)."""
    if pid is None or not alive(pid):
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
        stat = proc_stat(pid)
        if stat is None or stat[1] != pgid or stat[0] in ("Z", "X"):
            continue
        members.append(pid)
        if not found_ours:
            with contextlib.suppress(OSError):
                found_ours = marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return members if found_ours else []


def signal_pid(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def write_private(path: Path, text: str) -> None:
    """Write a file readable by the daemon's user only, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def vram_of(model: str | None) -> int:
    gpu = canonical_gpu(model) if model else None
    return gpu.vram_gb if gpu else 0


def meminfo_gb() -> int:
    text = read_text(Path("/proc/meminfo")) or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) // (1024 * 1024) if m else 0


def marked_processes(inst_dir: Path) -> list[int]:
    """Every live process carrying this instance's marker, whatever its group or session (a
    job's child that called setsid still carries it)."""
    marker = os.fsencode(f"{MARKER_ENV}={inst_dir}")
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0"):
                if alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


def processes_of_uid(uid: int) -> list[int]:
    """Live processes whose real uid is `uid`."""
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        text = read_text(Path(f"/proc/{entry.name}/status")) or ""
        m = re.search(r"^Uid:\s+(\d+)", text, re.MULTILINE)
        if m and int(m.group(1)) == uid and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give a directory tree to uid:gid, never following a link (the tree may be a job's)."""
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
