"""The job agent: the small supervisor that wraps a job's command on the machine that runs it.

It exists because the daemon cannot see a process on a cloud machine (and must not be the parent
of one on the local machine, so that jobs outlive daemon restarts). It runs the job as a child in
its own process group, forwards SIGTERM (a preemption notice or a stop) to it, and reports what
happened in three places, so that at least one survives any single failure:

* files in `--dir` (local provider): `agent.pid`, `job.pid`, and `exit.json` when the job ends;
* `$GPUHOP_VOLUME/.gpuhop/<attempt name>.exit` (every provider), read after a relaunch;
* HTTP reports to `$GPUHOP_CALLBACK_URL` with the per-attempt `$GPUHOP_TOKEN` (start,
  heartbeats carrying new log output, an interruption notice, and the exit code).

Standard library only: on a cloud it is shipped inside the launch request (`cloud_bootstrap`)
and runs with whatever `python3` the job's image has.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HEARTBEAT_SECONDS = float(os.environ.get("GPUHOP_HEARTBEAT", "10"))
STOP_GRACE_SECONDS = float(os.environ.get("GPUHOP_STOP_GRACE", "10"))
MAX_LOG_CHUNK = 256 * 1024

BOOTSTRAP_ARGV = [
    "python3",
    "-c",
    'import base64,os;exec(compile(base64.b64decode(os.environ["GPUHOP_AGENT_B64"]),"gpuhop-agent","exec"))',
]
BOOTSTRAP_SHELL = shlex.join(BOOTSTRAP_ARGV)  # the same, as one /bin/sh command line


def cloud_bootstrap(command: list[str]) -> tuple[str, dict[str, str]]:
    """What a cloud adapter runs instead of the job's command: a fixed shell line (no user text
    in it) plus two environment variables carrying the agent's source and the job's command as
    JSON. The line holds double quotes: escape it for the provider's wire format."""
    source = Path(__file__).read_bytes()
    env = {
        "GPUHOP_AGENT_B64": base64.b64encode(source).decode("ascii"),
        "GPUHOP_COMMAND": json.dumps(command),
    }
    return BOOTSTRAP_SHELL, env


def _write_json_atomic(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _set_pdeathsig() -> None:
    """Kill the job if the agent dies (Linux), so a killed agent never leaves a stray job."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Reporter:
    """Posts reports to the daemon; never raises, never blocks the job."""

    def __init__(self, url: str, token: str, name: str, log_path: Path | None) -> None:
        self.url = url
        self.token = token
        self.name = name
        self.log_path = log_path
        self.log_offset = 0
        self.lock = threading.Lock()

    def post(self, event: str, **fields: object) -> bool:
        if not self.url:
            return False
        with self.lock:
            body: dict[str, object] = {"attempt": self.name, "event": event, **fields}
            chunk = self._next_log_chunk()
            if chunk:
                body["log_offset"] = self.log_offset
                body["log"] = chunk.decode("utf-8", "replace")
            req = urllib.request.Request(
                self.url,
                data=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                if chunk:
                    self.log_offset += len(chunk)
                return True
            except (urllib.error.URLError, OSError, ValueError):
                return False

    def _next_log_chunk(self) -> bytes:
        if self.log_path is None or not self.log_path.exists():
            return b""
        with open(self.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            return fh.read(MAX_LOG_CHUNK)


def _seconds_left(notice: dict[str, object]) -> float | None:
    """Seconds until the reclaim in a notice such as {"action": "terminate", "time": "...Z"}."""
    from datetime import datetime

    try:
        deadline = datetime.fromisoformat(str(notice.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return deadline.timestamp() - time.time()


def _watch_metadata(url: str, reporter: Reporter, stop: threading.Event, on_notice: Callable[[], None]) -> None:
    """Poll the cloud's instance metadata for a spot interruption notice. Report it at once (the
    daemon starts the replacement), but let the job keep working: the daemon stops this machine
    when the replacement is ready, and only if that has not happened when little of the notice
    is left does the agent tell the job to checkpoint (SIGTERM) itself."""
    poll = float(os.environ.get("GPUHOP_METADATA_POLL", "2"))
    margin = float(os.environ.get("GPUHOP_CHECKPOINT_MARGIN", "30"))
    while not stop.wait(poll):
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                notice = json.loads(resp.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError):
            continue
        if isinstance(notice, dict) and notice.get("action"):
            reporter.post("interruption", notice=notice)
            left = _seconds_left(notice)
            if left is not None and left > 0:
                stop.wait(max(0.0, left - min(margin, left / 2)))
            if not stop.is_set():
                on_notice()
            return


def run(command: list[str], state_dir: Path | None, log_path: Path | None) -> int:
    env = dict(os.environ)
    env.pop("GPUHOP_AGENT_B64", None)
    env.pop("GPUHOP_COMMAND", None)
    name = env.get("GPUHOP_ATTEMPT_NAME", "")
    volume = env.get("GPUHOP_VOLUME", "")
    reporter = Reporter(env.get("GPUHOP_CALLBACK_URL", ""), env.get("GPUHOP_TOKEN", ""), name, log_path)

    stop_requested = threading.Event()
    foreign_sigterm = threading.Event()  # a SIGTERM gpuhop did not ask for: a reclaim notice
    out = open(log_path, "ab") if log_path else None
    child = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=out or None,
        stderr=subprocess.STDOUT if out else None,
        env=env,
        start_new_session=True,
        preexec_fn=_set_pdeathsig,
    )
    if state_dir:
        (state_dir / "job.pid").write_text(str(child.pid))

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGTERM:
            if state_dir and (state_dir / "stop-requested").exists():
                stop_requested.set()
            else:
                foreign_sigterm.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    def notice_received() -> None:
        """A reclaim notice seen from inside the machine: tell the job to checkpoint now."""
        foreign_sigterm.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    done = threading.Event()
    reporter.post("start", pid=child.pid)

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            reporter.post("heartbeat")

    threading.Thread(target=heartbeat, daemon=True).start()
    metadata_url = env.get("GPUHOP_METADATA_URL", "")
    if metadata_url:
        threading.Thread(
            target=_watch_metadata, args=(metadata_url, reporter, done, notice_received), daemon=True
        ).start()

    code = child.wait()
    done.set()
    if stop_requested.is_set() or (state_dir and (state_dir / "stop-requested").exists()):
        stop_requested.set()
    result: dict[str, object] = {
        "exit_code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "stopped_by_us": stop_requested.is_set(),
        "sigterm_received": foreign_sigterm.is_set() and not stop_requested.is_set(),
        "ended_at": time.time(),
    }
    if out:
        out.flush()
    if volume:
        with contextlib.suppress(OSError):
            marker = Path(volume) / ".gpuhop"
            marker.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(marker / f"{name or 'attempt'}.exit", result)
    if state_dir:
        _write_json_atomic(state_dir / "exit.json", result)
    for _ in range(3):  # the exit report matters most: try a few times
        if reporter.post("exit", **result) or not reporter.url:
            break
        time.sleep(1)
    if env.get("GPUHOP_LINGER") == "1":
        # Providers such as RunPod restart a container whose main process exits, which would
        # run the job again. Stay up, idle, until the daemon terminates the machine.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        while True:
            time.sleep(3600)
    return code if code >= 0 else 128 + (-code)


def _daemonize() -> None:
    """Detach (double fork) so the launching daemon is not our parent: jobs outlive it."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    state_dir: Path | None = None
    log_path: Path | None = None
    daemonize = False
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--":
            break
        if flag == "--dir":
            state_dir = Path(args.pop(0))
        elif flag == "--log":
            log_path = Path(args.pop(0))
        elif flag == "--daemonize":
            daemonize = True
        else:
            print(f"gpuhop-agent: unknown option {flag}", file=sys.stderr)
            return 2
    command = args or json.loads(os.environ.get("GPUHOP_COMMAND", "[]"))
    if not command:
        print("gpuhop-agent: no command (give it after -- or in GPUHOP_COMMAND)", file=sys.stderr)
        return 2
    if log_path is None and os.environ.get("GPUHOP_CALLBACK_URL"):
        # on a cloud the daemon sees the output only through our reports: keep it in a file
        # and mirror it to stdout from the job's own console
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpuhop-{os.environ.get('GPUHOP_ATTEMPT_NAME', 'job')}.log"
    if daemonize:
        _daemonize()
    if state_dir:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "agent.pid").write_text(str(os.getpid()))
    try:
        return run(command, state_dir, log_path)
    except OSError as exc:  # the program could not be started: report it as exit 127
        result: dict[str, object] = {"exit_code": 127, "signal": None, "stopped_by_us": False, "ended_at": time.time(), "error": str(exc)}
        if log_path:
            with open(log_path, "ab") as fh:
                fh.write(f"gpuhop-agent: cannot start {command[0]!r}: {exc}\n".encode())
        if state_dir:
            _write_json_atomic(state_dir / "exit.json", result)
        return 127


if __name__ == "__main__":
    sys.exit(main())
