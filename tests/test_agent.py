"""The job agent as a real process against a real HTTP receiver: its exit report survives a
daemon that answers 503, a 410 ends it, all of a chatty job's output arrives before the exit
report, heartbeats go on while it reports and lingers, a killed agent never leaves its job
behind, and the job sees none of the agent's secrets.

These exist because the agent's promises are about races and retries between processes and a
network peer (issue 7): only real processes and a real server can break them. Nothing here
asserts a speed: the agent's retry and heartbeat intervals are set small through its
environment, and every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import orchestrator.agent as agent_module

PY = sys.executable
AGENT = agent_module.__file__
REPO = Path(__file__).resolve().parents[1]
DEADLINE = 60.0

Answer = Callable[[dict[str, Any], list[dict[str, Any]]], int]


def wait_for(check: Callable[[], Any], within: float = DEADLINE, what: str = "condition") -> Any:
    end = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Receiver:
    """A daemon's report endpoint: records every report and answers what `answer` says."""

    def __init__(self, answer: Answer, reply: bytes = b"{}") -> None:
        self.reports: list[dict[str, Any]] = []
        self.reply = reply
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["_auth"] = self.headers.get("Authorization")
                with outer.lock:
                    status = answer(body, outer.reports)
                    body["_status"] = status
                    outer.reports.append(body)
                self.send_response(status)
                self.send_header("Content-Length", str(len(outer.reply)))
                self.end_headers()
                self.wfile.write(outer.reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/agent/report"

    def events(self) -> list[str]:
        with self.lock:
            return [r["event"] for r in self.reports]

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.reports)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(answer: Answer, reply: bytes = b"{}") -> Receiver:
        made.append(Receiver(answer, reply))
        return made[-1]

    yield make
    for r in made:
        r.close()


def always(status: int) -> Answer:
    return lambda _body, _seen: status


def agent_env(tmp_path: Path, url: str = "", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHOP_")}
    env.update(
        TMPDIR=str(tmp_path),
        GPUHOP_ATTEMPT_NAME="gpuhop-agt-1",
        GPUHOP_JOB_ID="agt",
        GPUHOP_ATTEMPT="1",
        GPUHOP_VOLUME=str(tmp_path / "volume"),
        GPUHOP_HEARTBEAT="3600",
        GPUHOP_REPORT_RETRY="0.05",
    )
    (tmp_path / "volume").mkdir(exist_ok=True)
    if url:
        env.update(GPUHOP_CALLBACK_URL=url, GPUHOP_TOKEN="tok-agent-secret-42")
    env.update(extra)
    return env


def start_agent(command: list[str], env: dict[str, str], *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-I", AGENT, *flags, "--", *command],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the agent did not end") from None
    return proc.returncode, out.decode()


def _environ_has(pid: str, needle: bytes) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rfind(")") + 2] in "ZX":
            return False
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def processes_with(var: str, value: str) -> list[int]:
    needle = f"{var}={value}".encode()
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _environ_has(e.name, needle)]


# --------------------------------------------------------------------------- parent death


def test_an_agent_killed_right_after_start_never_leaves_its_job(tmp_path: Path) -> None:
    """Kill -9 the agent at points spread over its start: before the job's fork, between the
    fork and the exec, and after. The job must never outlive it."""
    trials = 24
    for i in range(trials):
        mark = f"{os.getpid()}-{i}"
        env = agent_env(tmp_path, PDEATH_TRIAL=mark)
        proc = subprocess.Popen(
            [PY, "-I", AGENT, "--", PY, "-c", "import time; time.sleep(300)"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        if i % 2:  # the moment a second process (the forked job) carries the mark
            def forked(p: subprocess.Popen[bytes] = proc, m: str = mark) -> bool:
                return p.poll() is not None or len(processes_with("PDEATH_TRIAL", m)) > 1

            wait_for(forked, what="the job's fork")
        else:  # anywhere over the agent's first ~120 ms
            time.sleep(0.01 * (i % 12))
        proc.kill()
        proc.wait()

        def gone(m: str = mark) -> bool:
            return not processes_with("PDEATH_TRIAL", m)

        wait_for(gone, what=f"trial {i}: the job to die with its agent")


CHILD_OF_A_DEAD_AGENT = """
import os, sys, time
from orchestrator import agent
parent = os.getpid()
pid = os.fork()
if pid == 0:
    while os.getppid() == parent:  # the agent dies between our fork and our exec
        time.sleep(0.005)
    agent.child_setup(agent._libc(), parent)
    open(sys.argv[1], "w").write("the job started without its agent")
    os._exit(0)
print(pid, flush=True)
os._exit(0)
"""


def test_a_job_whose_agent_died_before_pdeathsig_was_set_never_starts(tmp_path: Path) -> None:
    flag = tmp_path / "survived"
    out = subprocess.run([PY, "-c", CHILD_OF_A_DEAD_AGENT, str(flag)], cwd=REPO, capture_output=True,
                         text=True, timeout=DEADLINE, check=True).stdout
    child = int(out.strip())
    wait_for(lambda: not Path(f"/proc/{child}").exists() or None, what="the orphan to exit")
    assert not flag.exists(), "a job whose agent was already dead went on to run"


# --------------------------------------------------------------------------- the exit report


CHATTY = """
import sys
line = "é✓ gpuhop %06d " + "x" * 90 + "\\n"
for i in range(int(sys.argv[1])):
    sys.stdout.write(line % i)
sys.stdout.write("the last line\\n")
"""


def chatty_output(lines: int) -> bytes:
    line = "é✓ gpuhop %06d " + "x" * 90 + "\n"
    return ("".join(line % i for i in range(lines)) + "the last line\n").encode()


def test_all_of_a_chatty_jobs_output_arrives_before_the_exit_report(
    tmp_path: Path, receivers: Callable[[Answer], Receiver]
) -> None:
    lines = 12000  # about 1.3 MiB, with multi-byte characters across chunk edges
    expected = chatty_output(lines)
    assert len(expected) > 1024 * 1024
    rx = receivers(always(200))
    proc = start_agent([PY, "-c", CHATTY, str(lines)], agent_env(tmp_path, rx.url))
    code, stdout = finish(proc)
    assert code == 0
    reports = rx.snapshot()
    assert [r["event"] for r in reports].count("exit") == 1
    exit_at = next(i for i, r in enumerate(reports) if r["event"] == "exit")
    got = b""
    for r in reports[: exit_at + 1]:
        if r.get("log"):
            assert r["log_offset"] == len(got), "chunks arrive in order, none twice"
            got += r["log"].encode()
    assert got == expected, f"{len(got)} of {len(expected)} bytes arrived before the exit report"
    assert all(not r.get("log") for r in reports[exit_at + 1 :])
    assert all(r["_auth"] == "Bearer tok-agent-secret-42" for r in reports)
    line = 'gpuhop-exit: {"attempt": "gpuhop-agt-1", "exit_code": 0, "exit_signal": null, "sigterm": false}'
    assert line in stdout.splitlines()


def test_an_exit_report_answered_503_is_retried_until_acknowledged_with_heartbeats_meanwhile(
    tmp_path: Path, receivers: Callable[[Answer], Receiver]
) -> None:
    def answer(body: dict[str, Any], seen: list[dict[str, Any]]) -> int:
        if body["event"] != "exit":
            return 200
        return 503 if sum(1 for r in seen if r["event"] == "exit") < 5 else 200

    rx = receivers(answer)
    env = agent_env(tmp_path, rx.url, GPUHOP_HEARTBEAT="0.05", GPUHOP_REPORT_RETRY="0.05")
    code, _ = finish(start_agent([PY, "-c", "import sys; sys.exit(3)"], env))
    assert code == 3
    reports = rx.snapshot()
    exits = [i for i, r in enumerate(reports) if r["event"] == "exit"]
    assert [reports[i]["_status"] for i in exits] == [503] * 5 + [200]
    assert all(reports[i]["exit_code"] == 3 for i in exits)
    between = [r for r in reports[exits[0] : exits[-1]] if r["event"] == "heartbeat"]
    assert between, "heartbeats stopped while the exit report was being retried"
    marker = json.loads((tmp_path / "volume" / ".gpuhop" / "gpuhop-agt-1.exit").read_text())
    assert marker["exit_code"] == 3


def test_410_gone_ends_the_exit_report(tmp_path: Path, receivers: Callable[[Answer], Receiver]) -> None:
    rx = receivers(lambda body, _seen: 410 if body["event"] == "exit" else 200)
    env = agent_env(tmp_path, rx.url, GPUHOP_EXIT_REPORT_MAX="3600")
    code, _ = finish(start_agent([PY, "-c", "pass"], env))
    assert code == 0
    assert rx.events().count("exit") == 1  # not retried for an hour


def test_an_unacknowledged_exit_report_gives_up_after_its_bound(
    tmp_path: Path, receivers: Callable[[Answer], Receiver]
) -> None:
    rx = receivers(always(503))
    env = agent_env(tmp_path, rx.url, GPUHOP_EXIT_REPORT_MAX="2", GPUHOP_REPORT_RETRY="0.05")
    code, stdout = finish(start_agent([PY, "-c", "pass"], env))
    assert code == 0
    assert rx.events().count("exit") > 3  # more than the three tries that used to be all
    assert '"exit_code": 0' in stdout


def test_a_lingering_agent_keeps_heartbeating_after_its_exit_was_acknowledged(
    tmp_path: Path, receivers: Callable[[Answer], Receiver]
) -> None:
    rx = receivers(always(200))
    env = agent_env(tmp_path, rx.url, GPUHOP_HEARTBEAT="0.05", GPUHOP_LINGER="1")
    proc = start_agent([PY, "-c", "pass"], env)
    try:
        def after_exit() -> int:
            events = rx.events()
            return events.index("exit") < len(events) - 3 if "exit" in events else False

        wait_for(after_exit, what="three heartbeats after the acknowledged exit report")
        assert proc.poll() is None  # still lingering
    finally:
        proc.kill()
        proc.communicate()


# --------------------------------------------------------------------------- what the job sees

ENV_DUMP = """
import json, os, sys
json.dump({k: v for k, v in os.environ.items() if k.startswith("GPUHOP_")}, open(sys.argv[1], "w"))
sys.exit(3)
"""


def test_the_job_sees_no_agent_variable_and_the_log_file_is_private(
    tmp_path: Path, receivers: Callable[[Answer], Receiver]
) -> None:
    rx = receivers(always(200))
    seen = tmp_path / "seen.json"
    env = agent_env(tmp_path, rx.url, GPUHOP_METADATA_URL="http://127.0.0.1:1/none", GPUHOP_LINGER="0",
                    GPUHOP_COMMAND='["ignored"]', GPUHOP_AGENT_B64="aWdub3JlZA==")
    code, stdout = finish(start_agent([PY, "-c", ENV_DUMP, str(seen)], env))
    assert code == 3
    assert json.loads(seen.read_text()) == {
        "GPUHOP_JOB_ID": "agt", "GPUHOP_ATTEMPT": "1", "GPUHOP_VOLUME": str(tmp_path / "volume"),
    }
    logs = list(tmp_path.glob("gpuhop-*.log"))
    assert len(logs) == 1 and logs[0].name != "gpuhop-gpuhop-agt-1.log"  # not guessable
    assert logs[0].stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"gpuhop-\w+\.log", logs[0].name)
    exit_lines = [ln for ln in stdout.splitlines() if ln.startswith("gpuhop-exit: ")]
    assert exit_lines == [
        'gpuhop-exit: {"attempt": "gpuhop-agt-1", "exit_code": 3, "exit_signal": null, "sigterm": false}'
    ]


def test_a_job_killed_by_a_foreign_sigterm_says_so_on_stdout(tmp_path: Path) -> None:
    env = agent_env(tmp_path)
    proc = start_agent([PY, "-c", "import time; print('up', flush=True); time.sleep(300)"], env,
                       "--dir", str(tmp_path / "inst"))
    wait_for(lambda: (tmp_path / "inst" / "job.pid").exists(), what="job.pid")
    proc.send_signal(signal.SIGTERM)  # not asked for by gpuhop: a reclaim notice
    code, stdout = finish(proc)
    assert code == 128 + signal.SIGTERM
    line = next(ln for ln in stdout.splitlines() if ln.startswith("gpuhop-exit: "))
    assert json.loads(line.removeprefix("gpuhop-exit: ")) == {
        "attempt": "gpuhop-agt-1", "exit_code": None, "exit_signal": signal.SIGTERM, "sigterm": True,
    }
    exit_info = json.loads((tmp_path / "inst" / "exit.json").read_text())
    assert exit_info["started_at"] <= exit_info["ended_at"]


def test_output_that_is_not_utf8_arrives_byte_exact_and_a_409_resumes_at_the_daemons_offset(
    tmp_path: Path,
) -> None:
    """The daemon keeps the log byte for byte and answers a chunk at the wrong offset with 409
    and the size of its copy: the agent must send bytes that are not UTF-8 unchanged (as
    surrogate escapes) and resume from that size, or the log would stop for the whole attempt."""
    stored = bytearray()
    lock = threading.Lock()
    refused_once: list[bool] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, answer = 200, b"{}"
            with lock:
                assert self.headers.get("X-Gpuhop-Attempt") == "gpuhop-agt-1"
                if body.get("log"):
                    data = body["log"].encode("utf-8", "surrogateescape")
                    if not refused_once:  # pretend the daemon already holds the first 5 bytes
                        refused_once.append(True)
                        stored.extend(data[:5])
                        status, answer = 409, json.dumps({"error": {"code": "log_offset", "message": "x"},
                                                          "expected_offset": 5}).encode()
                    elif body["log_offset"] == len(stored):
                        stored.extend(data)
                    else:
                        status = 409
                        answer = json.dumps({"error": {}, "expected_offset": len(stored)}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/agent/report"
        expected = b"start \xff\xfe latin-1 caf\xe9\n" + "ok ✓\n".encode() + b"\x80 end\n"
        script = f"import sys; sys.stdout.buffer.write({expected!r}); sys.stdout.flush()"
        code, _ = finish(start_agent([PY, "-c", script], agent_env(tmp_path, url)))
        assert code == 0
        with lock:
            assert refused_once and bytes(stored) == expected
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- replicas


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1/agent/report"


def test_reports_fail_over_to_the_next_replica_when_one_is_gone(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    rx = receivers(always(200))
    env = agent_env(tmp_path, f"{_closed_port_url()} {rx.url}", GPUHOP_HEARTBEAT="0.05")
    code, _ = finish(start_agent([PY, "-c", "import sys; sys.exit(4)"], env))
    assert code == 4
    assert [r["exit_code"] for r in rx.snapshot() if r["event"] == "exit"] == [4]


def test_an_agent_learns_replicas_started_after_its_launch_from_the_acknowledgements(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    """Launched knowing one replica; that replica names a second in its answers, then dies:
    the rest of the reports, the exit among them, reach the second."""
    second = receivers(always(200))
    first = receivers(always(200), json.dumps({"ok": True, "report_urls": [second.url]}).encode())
    go = tmp_path / "go"
    job = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.02)"
    env = agent_env(tmp_path, first.url, GPUHOP_HEARTBEAT="0.05")
    proc = start_agent([PY, "-c", job], env)
    wait_for(lambda: "start" in first.events(), what="the start report")
    first.close()  # the launching replica is gone
    go.write_text("")
    code, _ = finish(proc)
    assert code == 0
    assert "exit" in second.events() and "exit" not in first.events()
