"""systemd integration: the notify protocol against real datagram sockets, the watchdog cadence,
the properties the shipped unit file must guarantee (parsed, each check shown to fail on a
broken unit), and the unit checked by systemd's own `systemd-analyze verify`.

These exist because none of it can be seen failing until a production restart: a READY=1 that
never arrives makes `systemctl start` hang and fail, a missing watchdog ping gets a healthy
daemon killed every minute, and a unit typo is silently ignored by systemd.
"""

from __future__ import annotations

import asyncio
import os
import re
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
#
# What the unit must guarantee, checked as properties of the parsed unit (not its text), each
# with a mutation below that proves the check can fail.

Unit = dict[str, dict[str, list[str]]]
FALSE = ("no", "false", "0", "off")
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL")


def parse_unit(text: str) -> Unit:
    """section -> key -> values, as systemd reads them: comments, continuation lines, keys that
    may repeat, and an empty assignment resetting the list."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith(("#", ";"))):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1].rstrip() + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    for line in logical:
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None and "=" in line, f"not a unit line: {line!r}"
        key, _, value = line.partition("=")
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


def timespan(value: str) -> float:
    """systemd.time(7) spans: "60", "90s", "1min 30s", "2h", "infinity"."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    if value.strip() == "infinity":
        return float("inf")
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def unit_problems(text: str) -> list[str]:
    """Everything the shipped unit must guarantee that this text does not."""
    unit = parse_unit(text)
    service, install, head = unit.get("Service", {}), unit.get("Install", {}), unit.get("Unit", {})

    def last(key: str, default: str | None = None) -> str | None:
        values = service.get(key)
        return values[-1] if values else default

    problems = []
    # systemd knows when the API listens (READY=1) and restarts a daemon whose loop hangs
    if last("Type") != "notify":
        problems.append("Type= must be notify: the daemon reports READY=1 once it listens")
    if last("NotifyAccess", "main") not in ("main", "exec", "all"):
        problems.append("NotifyAccess= must let the main process notify")
    watchdog = timespan(last("WatchdogSec", "0") or "0")
    if not 0 < watchdog < float("inf"):
        problems.append("WatchdogSec= must be set: a hung loop must get the daemon restarted")
    if last("Restart", "no") not in ("on-failure", "on-abnormal", "on-watchdog", "always"):
        problems.append("Restart= must restart after a crash or a watchdog timeout")
    # restarting or stopping the daemon never kills the local jobs (they share its cgroup)
    if last("KillMode", "control-group") != "process":
        problems.append("KillMode= must be process: a restart must not kill running jobs")
    for key in ("RemoveIPC", "PrivateDevices", "MemoryDenyWriteExecute", "DynamicUser"):
        if last(key, "no") not in FALSE:
            problems.append(f"{key}= breaks GPU jobs, jobs that outlive a restart, or the state's owner")
    # a daemon (root or not: local jobs run under uids of their own) that can write only where
    # it must, whose state is private to it, and whose jobs cannot gain privileges
    if last("NoNewPrivileges", "no") in FALSE:
        problems.append("NoNewPrivileges= must be yes: a job must not regain privileges via setuid programs")
    if last("ProtectSystem", "no") != "strict":
        problems.append("ProtectSystem= must be strict: only the state directory is writable")
    state_dirs = (last("StateDirectory") or "").split()
    command = (last("ExecStart") or "").split()
    if "--state-dir" not in command or "serve" not in command:
        problems.append("ExecStart= must run `gpuhop serve --state-dir DIR`")
    elif not state_dirs or command[command.index("--state-dir") + 1] != f"/var/lib/{state_dirs[0]}":
        problems.append("--state-dir must be the StateDirectory= systemd creates (owned by User=, writable)")
    mode = last("StateDirectoryMode", "0755") or "0755"
    if int(mode, 8) & 0o077:
        problems.append(f"StateDirectoryMode={mode}: the token and the database must not be readable by others")
    umask = last("UMask", "0022") or "0022"
    if int(umask, 8) & 0o077 != 0o077:
        problems.append(f"UMask={umask}: files the daemon creates (logs, volumes) must be private")
    # credentials only from a file, never in the unit (world-readable, shown by systemctl show)
    for assignment in " ".join(service.get("Environment", [])).split():
        name, _, value = assignment.strip('"').partition("=")
        if value and any(w in name.upper() for w in SECRET_WORDS):
            problems.append(f"Environment={name}=...: a secret written into the unit")
    if any(flag in command for flag in ("--token", "--api-key")):
        problems.append("ExecStart= passes a secret on the command line (visible in ps)")
    if not service.get("EnvironmentFile"):
        problems.append("EnvironmentFile= must carry the credentials")
    # started at boot, once the network is up (the adapters call the clouds at start)
    if "network-online.target" not in " ".join(head.get("After", [])):
        problems.append("After=network-online.target is missing")
    if "multi-user.target" not in " ".join(install.get("WantedBy", [])):
        problems.append("WantedBy=multi-user.target is missing: `systemctl enable` would not start it at boot")
    return problems


def set_directive(text: str, key: str, value: str | None) -> str:
    """The unit with every `key=` line in [Service] replaced by `key=value` (None: removed, or
    added when absent)."""
    lines, out, done, section = text.splitlines(), [], False, ""
    for line in lines:
        if line.startswith("["):
            if section == "Service" and not done and value is not None:
                out.append(f"{key}={value}")
                done = True
            section = line.strip("[]")
        if section == "Service" and line.split("=", 1)[0].strip() == key:
            if value is not None and not done:
                out.append(f"{key}={value}")
                done = True
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def test_unit_guarantees_what_the_daemon_relies_on() -> None:
    assert unit_problems(UNIT.read_text()) == []


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("Type", "simple", "Type="),
        ("NotifyAccess", "none", "NotifyAccess="),
        ("WatchdogSec", None, "WatchdogSec="),
        ("WatchdogSec", "0", "WatchdogSec="),
        ("Restart", "no", "Restart="),
        ("Restart", None, "Restart="),
        ("KillMode", "control-group", "KillMode="),
        ("KillMode", None, "KillMode="),
        ("RemoveIPC", "yes", "RemoveIPC="),
        ("PrivateDevices", "true", "PrivateDevices="),
        ("DynamicUser", "yes", "DynamicUser="),
        ("NoNewPrivileges", None, "NoNewPrivileges="),
        ("ProtectSystem", "full", "ProtectSystem="),
        ("StateDirectory", "elsewhere", "--state-dir"),
        ("StateDirectoryMode", None, "StateDirectoryMode="),
        ("StateDirectoryMode", "0755", "StateDirectoryMode="),
        ("UMask", "0022", "UMask="),
        ("Environment", "RUNPOD_API_KEY=rpa_live_0123", "a secret written into the unit"),
        ("Environment", '"AWS_SECRET_ACCESS_KEY=abc" "X=1"', "a secret written into the unit"),
        ("EnvironmentFile", None, "EnvironmentFile="),
        ("ExecStart", "/usr/local/bin/gpuhop serve --state-dir /var/lib/gpuhop --token s3cr3t", "secret on the command line"),
        ("ExecStart", "/usr/local/bin/gpuhop serve", "ExecStart="),
    ],
)
def test_unit_check_catches(key: str, value: str | None, problem: str) -> None:
    broken = set_directive(UNIT.read_text(), key, value)
    assert broken != UNIT.read_text() or value is None
    problems = unit_problems(broken)
    assert any(problem in p for p in problems), problems


def test_unit_parser_reads_systemd_syntax() -> None:
    unit = parse_unit("[Service]\n# c\nEnvironment=A=1 \\\n  B=2\nEnvironment=C=3\nX=1\nX=\nX=2\n")
    assert unit["Service"] == {"Environment": ["A=1 B=2", "C=3"], "X": ["2"]}
    assert timespan("1min 30s") == 90 and timespan("60") == 60 and timespan("infinity") == float("inf")


def test_env_example_holds_placeholders_only() -> None:
    text = ENV_EXAMPLE.read_text()
    for key in ("GPUHOP_TOKEN", "RUNPOD_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert key in text
    for line in text.splitlines():
        assert not line.strip() or line.startswith("#"), f"uncommented value: {line}"


def _verify(unit_text: str, tmp_path: Path) -> tuple[int, str]:
    """systemd-analyze verify on a copy whose ExecStart and user exist on this machine."""
    exe = shutil.which("true") or "/bin/true"

    def runnable(m: re.Match[str]) -> str:  # a program not installed here becomes `true`
        return m.group(0) if os.path.exists(m.group(3)) else f"{m.group(1)}{m.group(2)}{exe}"

    text = re.sub(r"^(Exec\w+=)([-+!@:]*)(\S+)", runnable, unit_text, flags=re.M)
    text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.M)
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
    broken = set_directive(UNIT.read_text(), "KilMode", "typo")
    _, complaints = _verify(broken, tmp_path)
    assert "KilMode" in complaints
