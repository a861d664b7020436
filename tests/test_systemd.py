"""systemd integration: the notify protocol against real datagram sockets, the watchdog cadence,
and the shipped unit file checked by systemd's own `systemd-analyze verify`.

These exist because none of it can be seen failing until a production restart: a READY=1 that
never arrives makes `systemctl start` hang and fail, a missing watchdog ping gets a healthy
daemon killed every minute, and a unit typo is silently ignored by systemd.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import systemd

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "gpuhop.service"
ENV_EXAMPLE = UNIT.parent / "gpuhop.env.example"


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A stand-in for systemd: a datagram socket named by NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_notify_delivers_to_a_path_socket(listener: socket.socket) -> None:
    assert systemd.notify("READY=1") is True
    assert listener.recv(4096) == b"READY=1"
    assert systemd.notify("STATUS=serving 3 jobs\nREADY=1") is True
    assert listener.recv(4096) == b"STATUS=serving 3 jobs\nREADY=1"


def test_notify_delivers_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"gpuhop-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_outside_systemd_is_a_quiet_no(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("60000000", "1", None),  # meant for another process
        ("1000", None, 0.0005),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, None, None),
        ("60000000", "x", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected


async def test_watchdog_loop_pings_while_healthy(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    stop = asyncio.Event()
    healthy = True
    task = asyncio.create_task(systemd.watchdog_loop(stop, lambda: healthy))
    await asyncio.sleep(0.4)
    pings = _drain(listener)
    assert len(pings) >= 2 and set(pings) == {b"WATCHDOG=1"}

    healthy = False  # an unhealthy daemon withholds its pings
    await asyncio.sleep(0.1)
    _drain(listener)
    await asyncio.sleep(0.3)
    assert _drain(listener) == []

    stop.set()
    await asyncio.wait_for(task, 1)


async def test_watchdog_loop_survives_a_broken_health_check(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    stop = asyncio.Event()

    def broken() -> bool:
        raise RuntimeError("boom")

    task = asyncio.create_task(systemd.watchdog_loop(stop, broken))
    await asyncio.sleep(0.2)
    assert not task.done() and _drain(listener) == []
    stop.set()
    await asyncio.wait_for(task, 1)


async def test_watchdog_loop_without_watchdog_waits_for_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    stop = asyncio.Event()
    task = asyncio.create_task(systemd.watchdog_loop(stop, lambda: True))
    await asyncio.sleep(0.05)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 1)


# --------------------------------------------------------------------------- the unit file


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_keeps_jobs_alive_and_talks_to_systemd() -> None:
    d = _directives(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "ExecStart": "/usr/local/bin/gpuhop serve --config /etc/gpuhop/config.toml --state-dir /var/lib/gpuhop",
        "User": "gpuhop",
        "Group": "gpuhop",
        "StateDirectory": "gpuhop",
        "EnvironmentFile": "-/etc/gpuhop/gpuhop.env",
        "Restart": "on-failure",
        "RestartSec": "5",
        "KillMode": "process",
        "TimeoutStopSec": "30",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "ReadWritePaths": "/var/lib/gpuhop",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    for forbidden in ("PrivateDevices", "DynamicUser", "MemoryDenyWriteExecute"):
        assert forbidden not in d, forbidden


def test_env_example_holds_placeholders_only() -> None:
    text = ENV_EXAMPLE.read_text()
    for key in ("GPUHOP_TOKEN", "RUNPOD_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert key in text
    for line in text.splitlines():
        assert not line.strip() or line.startswith("#"), f"uncommented value: {line}"


def _verify(unit_text: str, tmp_path: Path) -> tuple[int, str]:
    """systemd-analyze verify on a copy whose ExecStart and user exist on this machine."""
    exe = shutil.which("true") or "/bin/true"
    text = unit_text.replace("ExecStart=/usr/local/bin/gpuhop", f"ExecStart={exe}")
    text = text.replace("User=gpuhop", "User=root").replace("Group=gpuhop", "Group=root")
    copy = tmp_path / "gpuhop.service"
    copy.write_text(text)
    proc = subprocess.run(
        [ANALYZE, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    complaints = "\n".join(
        line for line in (proc.stdout + proc.stderr).splitlines() if "gpuhop.service" in line
    )
    return proc.returncode, complaints


ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
needs_analyze = pytest.mark.skipif(
    not os.access(ANALYZE, os.X_OK), reason="systemd-analyze is not installed on this machine"
)


@needs_analyze
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    code, complaints = _verify(UNIT.read_text(), tmp_path)
    assert complaints == ""
    assert code == 0


@needs_analyze
def test_systemd_analyze_check_is_not_vacuous(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("KillMode=process", "KillMode=process\nKilMode=typo")
    _, complaints = _verify(broken, tmp_path)
    assert "KilMode" in complaints
