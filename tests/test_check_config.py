"""`gpuhop check-config` (issue 10.13): after the file, one cheap read-only call per provider,
one line each, ok or failed, exit 1 when any failed, and no credential in what it prints.
Real `gpuhop` processes against the RunPod and AWS simulators (their own processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.harness import free_port
from tests.daemon_harness import SimProcess

KEY = "rpa_CHECK0123456789ABCDEF"
WRONG = "rpa_WRONG9876543210FEDCBA"
AWS_SECRET = "check-config-secret-do-not-print"


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, SimProcess]]:
    root = tmp_path_factory.mktemp("check")
    runpod = SimProcess("runpod", root / "runpod", "--api-key", KEY)
    aws = SimProcess("aws", root / "aws")
    try:
        yield runpod, aws
    finally:
        runpod.stop()
        aws.stop()


def _config(tmp_path: Path, runpod_url: str, aws_url: str, key: str = KEY) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f"""
[server]
listen = "127.0.0.1:0"
[providers.runpod]
api_key = "{key}"
api_url = "{runpod_url}"
request_timeout_seconds = 3
[providers.aws]
regions = ["us-east-1"]
endpoint_url = "{aws_url}"
access_key_id = "testing"
secret_access_key = "{AWS_SECRET}"
request_timeout = 3
[providers.local]
cpu_slots = 1
isolation = "none"
""")
    return path


def _check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "check-config", str(config), *extra],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_every_provider_answers(sims: tuple[SimProcess, SimProcess], tmp_path: Path) -> None:
    runpod, aws = sims
    done = _check(_config(tmp_path, runpod.url, aws.url), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is True
    assert {p["name"]: p["ok"] for p in out["providers"]} == {"runpod": True, "aws": True, "local": True}
    assert KEY not in done.stdout + done.stderr and AWS_SECRET not in done.stdout + done.stderr


def test_a_refused_key_and_an_unreachable_endpoint_fail_one_line_each(
        sims: tuple[SimProcess, SimProcess], tmp_path: Path) -> None:
    runpod, _ = sims
    dead = f"http://127.0.0.1:{free_port()}"
    done = _check(_config(tmp_path, runpod.url, dead, key=WRONG))
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    lines = {line.split(":")[0].strip(): line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert "failed" in lines["runpod"] and "credentials refused" in lines["runpod"], text
    assert "failed" in lines["aws"], text
    assert "ok" in lines["local"] and "failed" not in lines["local"], text
    assert WRONG not in text and AWS_SECRET not in text and "Traceback" not in text


def test_offline_calls_no_provider(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    done = _check(_config(tmp_path, dead, dead), "--offline")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout
