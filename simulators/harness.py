"""Running gpuhop as a user would, from Python: a `gpuhop serve` daemon process with its own
config and state dir, a provider simulator as its own process (`gpuhop sim ...`), and helpers
to wait on them. Shared by `gpuhop demo`, the end-to-end tests and the benchmarks, so all three
exercise the same real processes the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.client import Client


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Daemon:
    def __init__(self, state_dir: Path, config: str, log_level: str = "DEBUG") -> None:
        self.state_dir = state_dir
        self.config_path = state_dir.parent / f"{state_dir.name}.toml"
        self.config_path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}.daemon.log"
        self.log_level = log_level

    def start(self) -> Client:
        server_file = self.state_dir / "server.json"
        if server_file.exists():
            server_file.unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHOP_")}
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "serve", "--config", str(self.config_path),
                 "--state-dir", str(self.state_dir), "--listen", "127.0.0.1:0", "--log-level", self.log_level],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        self.proc = proc
        wait_for(lambda: server_file.exists() or proc.poll() is not None, 30, what="daemon start")
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{self.log()}")
        url = json.loads(server_file.read_text())["url"]
        self.client = Client(url, (self.state_dir / "token").read_text().strip())
        return self.client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("daemon did not stop within 30 s of SIGTERM") from None

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            job = self.client.job(job_id)
            return job if job["status"] in statuses else None

        try:
            return wait_for(check, timeout, what=f"job {job_id} in {statuses}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- job ---\n{json.dumps(self.client.job(job_id), indent=1)[-3000:]}"
                                 f"\n--- daemon log ---\n{self.log()}") from None


def steps_done(volume_dir: Path) -> list[int]:
    log = volume_dir / "steps.log"
    if not log.exists():
        return []
    return [int(line.split()[0]) for line in log.read_text().splitlines() if line.strip()]


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and ") Z " in stat.read_text():
            continue  # a zombie is dead, only unreaped
        alive.append(pid)
    return alive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimProcess:
    """A provider simulator run as its own process (`gpuhop sim <provider>`), as a user would."""

    def __init__(self, provider: str, state_dir: Path, *args: str, ready_path: str = "/_sim/ledger") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"sim-{provider}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "sim", provider, "--port", str(self.port),
                 "--state-dir", str(state_dir), *args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"simulator exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}{ready_path}", timeout=2).read()
                return True
            except OSError:
                return False

        wait_for(up, 30, what=f"{provider} simulator up")

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
