"""Starting the daemon (issue 7.8): a configuration mistake is one line naming the key, at
`gpuhop check-config` and at start-up alike; a second daemon on one state dir refuses to start
instead of running a second loop over the same database. Real `gpuhop` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from simulators.harness import Daemon

GPUHOP = [sys.executable, "-m", "orchestrator.cli"]


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GPUHOP, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL, check=False)


def _env_without_runpod_key() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RUNPOD_API_KEY"}


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_missing_runpod_key_is_one_line_naming_the_key(tmp_path: Path, command: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n[providers.runpod]\napi_url = "http://127.0.0.1:9"\n')
    args = [command, str(config)] if command == "check-config" else [command, "-c", str(config),
                                                                     "--state-dir", str(tmp_path / "s")]
    done = _run(args, _env_without_runpod_key())
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any("providers.runpod" in line and "api_key" in line and "RUNPOD_API_KEY" in line for line in lines), done.stderr
    assert "Traceback" not in done.stderr and len(lines) <= 3, done.stderr


def test_a_second_daemon_on_one_state_dir_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = Daemon(state, '[server]\nlisten = "127.0.0.1:0"\n[providers.local]\ncpu_slots = 1\nisolation = "none"\n')
    first.start()
    try:
        done = _run(["serve", "-c", str(first.config_path), "--state-dir", str(state)])
        assert done.returncode != 0
        assert "another gpuhop daemon" in done.stderr and str(first.proc.pid if first.proc else "") in done.stderr
        assert "Traceback" not in done.stderr
        assert first.proc is not None and first.proc.poll() is None  # the first one is untouched
        first.client.jobs()  # and still answers
    finally:
        first.stop()
    # the lock dies with its process, even a killed one: the next daemon starts
    again = Daemon(state, first.config_path.read_text())
    again.start()
    again.kill9()
    third = Daemon(state, first.config_path.read_text())
    third.start()
    third.stop()


def test_status_says_how_the_daemon_is(tmp_path: Path) -> None:
    """`gpuhop status` against a real daemon: version, its loop, each provider, jobs by status,
    the state dir, the database's kind; `--json` for scripts; and `gpuhop --version`."""
    state = tmp_path / "state"
    daemon = Daemon(state, '[server]\nlisten = "127.0.0.1:0"\n[providers.local]\ncpu_slots = 1\nisolation = "none"\n')
    client = daemon.start()
    try:
        job = client.submit({"name": "sleeper", "command": [sys.executable, "-c", "import time; time.sleep(60)"],
                             "resources": {"gpu_count": 0}})
        done = _run(["status", "--state-dir", str(state), "--json"])
        assert done.returncode == 0, done.stderr
        import json

        data = json.loads(done.stdout)
        assert data["version"] and data["database"] == "sqlite" and data["state_dir"] == str(state)
        assert set(data["providers"]) == {"local"} and sum(data["jobs"].values()) == 1
        assert data["uptime_seconds"] >= 0 and data["ticks"] >= 0
        text = _run(["status", "--state-dir", str(state)])
        assert text.returncode in (0, 1), text.stderr  # 1 only if the loop had not ticked yet
        assert "gpuhop " in text.stdout and "local" in text.stdout and str(state) in text.stdout
        assert "1 " in text.stdout.split("jobs:")[-1]
        table = _run(["costs", "--state-dir", str(state), "--since", "1h"])
        assert table.returncode == 0 and "costs by provider" in table.stdout and "total" in table.stdout, table
        by_job = json.loads(_run(["costs", "--state-dir", str(state), "--by", "job", "--json"]).stdout)
        assert by_job["by"] == "job" and by_job["total"]["cost_usd"] >= 0
        bad = _run(["costs", "--state-dir", str(state), "--since", "a week"])
        assert bad.returncode == 2 and "since" in bad.stderr and "Traceback" not in bad.stderr
        # a job by its name or a unique prefix of its id, as well as by its id
        for ref in ("sleeper", job["id"][:5], job["id"]):
            shown = json.loads(_run(["show", ref, "--state-dir", str(state), "--json"]).stdout)
            assert shown["id"] == job["id"], ref
        unknown = _run(["show", "no-such-job", "--state-dir", str(state)])
        assert unknown.returncode == 2 and "no job with id, id prefix or name" in unknown.stderr
    finally:
        daemon.stop()
    version = _run(["--version"])
    assert version.returncode == 0 and version.stdout.startswith("gpuhop ")


@pytest.mark.parametrize(("public_url", "warned"), [
    ("", True),  # the listen address, 127.0.0.1
    ("http://localhost:8480", True),
    ("http://[::1]:8480", True),
    ("https://gpuhop.example.com", False),
    ("http://203.0.113.7:8480", False),
])
def test_a_loopback_public_url_with_a_cloud_provider_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, public_url: str, warned: bool) -> None:
    from orchestrator.config import load_settings
    from orchestrator.daemon import warn_unreachable_agents
    from tests.fake_provider import FakeAdapter

    class Cloud(FakeAdapter):
        remote = True

    settings = load_settings(None, {"server": {"state_dir": str(tmp_path), "listen": "127.0.0.1:8480",
                                               "public_url": public_url}})
    cloud = Cloud.create(tmp_path)
    with caplog.at_level("WARNING", logger="gpuhop.daemon"):
        warn_unreachable_agents(settings, {"runpod": cloud})
        assert any("loopback" in r.getMessage() and "runpod" in r.getMessage() for r in caplog.records) is warned
        caplog.clear()
        warn_unreachable_agents(settings, {"local": FakeAdapter.create(tmp_path)})  # nothing remote: fine
        assert not caplog.records


class _Pipe:
    """Everything a child writes to one pipe, read on a thread, so a test waits for a line
    instead of sleeping for it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.data = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            with self._lock:
                self.data += chunk

    def text(self) -> str:
        with self._lock:
            return self.data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert time.monotonic() < deadline, f"{needle!r} never came; got {self.text()!r}"
            time.sleep(0.05)

    def close(self) -> str:
        self._thread.join(timeout=30)
        return self.text()


def test_logs_follow_and_watch_survive_a_daemon_restart(tmp_path: Path) -> None:
    """`gpuhop logs -f` and a piped `gpuhop watch` keep going across a daemon restart (on
    another port: they look the daemon up again), say so, show each line once, and end with
    the job. Each step waits for what the followers printed, not for time to pass."""
    state = tmp_path / "state"
    gate, stop = tmp_path / "gate", tmp_path / "stop"
    code = ("import os, time\nprint('one', flush=True)\n"
            f"while not os.path.exists({str(gate)!r}): time.sleep(0.05)\n"
            "print('two', flush=True)\n"
            f"while not os.path.exists({str(stop)!r}): time.sleep(0.05)\n")
    config = ('[server]\nlisten = "127.0.0.1:0"\n[engine]\ntick_seconds = 0.5\n'
              '[providers.local]\ncpu_slots = 1\nisolation = "none"\n')
    daemon = Daemon(state, config)
    client = daemon.start()
    job = client.submit({"name": "chatty", "command": [sys.executable, "-c", code], "resources": {"gpu_count": 0}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHOP_")}
    daemon.wait_status(job["id"], {"running"}, timeout=60)
    follow = subprocess.Popen([*GPUHOP, "logs", job["id"], "-f", "--state-dir", str(state)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    watch = subprocess.Popen([*GPUHOP, "watch", job["id"], "--interval", "0.3", "--state-dir", str(state)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert follow.stdout and follow.stderr and watch.stdout and watch.stderr
    f_out, f_err, w_out, w_err = (_Pipe(s) for s in (follow.stdout, follow.stderr, watch.stdout, watch.stderr))
    try:
        f_out.wait_for("one")  # both followers are connected and have shown the job once
        w_out.wait_for("running")
        daemon.stop()
        f_err.wait_for("reconnecting")  # they noticed the daemon is away and said so
        w_err.wait_for("does not answer")
        gate.touch()  # the job prints while the daemon is away
        daemon.start()
        f_out.wait_for("two")
        stop.touch()  # and the job ends after the restart
        follow.wait(timeout=120)
        watch.wait(timeout=120)
    finally:
        for proc in (follow, watch):
            if proc.poll() is None:
                proc.kill()
        daemon.stop()
    assert follow.returncode == 0, f_err.close()
    text = f_out.close()
    assert text.count("one") == 1 and text.count("two") == 1, text
    assert watch.returncode == 0, w_err.close()
    assert "succeeded" in w_out.close()
