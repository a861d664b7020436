"""Starting the daemon (issue 7.8): a configuration mistake is one line naming the key, at
`gpuhop check-config` and at start-up alike; a second daemon on one state dir refuses to start
instead of running a second loop over the same database. Real `gpuhop` processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
