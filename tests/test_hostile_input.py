"""Hostile input against a real `gpuhop serve` process: bodies nested a thousand deep, integers
of 5,001 digits, lone surrogates, an Authorization header that is not UTF-8, on the user API and
on the agents' endpoint (whose token is checked before its body is read). Each is a 4xx with a
message; afterwards the daemon has counted no 5xx and no failed tick, and still runs a job."""

from __future__ import annotations

import json
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.daemon_harness import Daemon

pytestmark = pytest.mark.e2e

CONFIG = """
[engine]
tick_seconds = 0.5
[providers.local]
cpu_slots = 2
"""
HEX_TOKEN = "ab" * 32  # shaped like an agent's token, valid for nothing


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("hostile") / "state", CONFIG, log_level="INFO")
    d.start()
    yield d
    d.stop()


def raw(d: Daemon, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request over a plain socket, bytes exactly as given (no client library tidies them)."""
    url = urlsplit(d.client.url)
    head = [f"{method} {path} HTTP/1.1".encode(), f"Host: {url.hostname}:{url.port}".encode(),
            b"Connection: close", f"Content-Length: {len(body)}".encode()]
    head += [k + b": " + v for k, v in headers]
    with socket.create_connection((url.hostname, url.port), timeout=60) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    fields = {}
    for line in header_block.split(b"\r\n"):
        k, _, v = line.partition(b":")
        fields[k.decode().strip().lower()] = v.decode().strip()
    return int(status_line.split()[1]), fields, payload


def auth(d: Daemon) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {d.client.token}".encode()), (b"Content-Type", b"application/json")]


AGENT = [(b"Authorization", f"Bearer {HEX_TOKEN}".encode()), (b"Content-Type", b"application/json")]
DEEP = b"[" * 1500 + b"]" * 1500
DEEP_OBJECT = b'{"a":' * 1200 + b"1" + b"}" * 1200
HUGE_INT = b'{"name": "x", "command": ["true"], "resources": {"gpu_count": ' + b"9" * 5001 + b"}}"
SPEC = {"name": "hostile", "command": [sys.executable, "-c", "print('still fine')"], "resources": {"gpu_count": 0}}

CASES = [
    # (what, method, path, headers (None: the API token), body, expected status)
    ("deep array, anonymous", "POST", "/v1/jobs", [], DEEP, 401),
    ("deep array", "POST", "/v1/jobs", None, DEEP, 400),
    ("deep object", "POST", "/v1/jobs", None, DEEP_OBJECT, 400),
    ("deep array to the agents' endpoint, anonymous", "POST", "/v1/agent/report", [], DEEP, 401),
    ("deep array to the agents' endpoint", "POST", "/v1/agent/report", AGENT, DEEP, 400),
    ("deep object to the agents' endpoint", "POST", "/v1/agent/report", AGENT, DEEP_OBJECT, 400),
    ("5,001-digit integer", "POST", "/v1/jobs", None, HUGE_INT, 400),
    ("5,001-digit integer to the agents' endpoint", "POST", "/v1/agent/report", AGENT,
     b'{"attempt": "gpuhop-ab-1", "event": "heartbeat", "log_offset": ' + b"7" * 5001 + b"}", 400),
    ("NaN", "POST", "/v1/jobs", None, b'{"name": "x", "command": ["true"], "policy": {"max_cost_usd": NaN}}', 400),
    ("lone surrogate in command", "POST", "/v1/jobs", None,
     json.dumps({**SPEC, "command": ["python3", "\ud800"]}).encode(), 422),
    ("lone surrogate in an env value", "POST", "/v1/jobs", None,
     json.dumps({**SPEC, "env": {"A": "\ud800"}}).encode(), 422),
    ("lone surrogate in an env name", "POST", "/v1/jobs", None,
     json.dumps({**SPEC, "env": {"\udfff": "x"}}).encode(), 422),
    ("lone surrogate in an unknown field's name", "POST", "/v1/jobs", None,
     json.dumps({**SPEC, "\ud800": 1}).encode(), 422),
    ("lone surrogate in the agent's attempt", "POST", "/v1/agent/report", AGENT,
     json.dumps({"attempt": "\ud800", "event": "start"}).encode(), 401),
    ("not UTF-8", "POST", "/v1/jobs", None, b'{"name": "\xff"}', 400),
    ("min_cuda not a version", "POST", "/v1/jobs", None,
     b'{"name": "x", "command": ["true"], "resources": {"min_cuda": "12.4\\n"}}', 422),
    ("min_cuda a number", "POST", "/v1/jobs", None,
     b'{"name": "x", "command": ["true"], "resources": {"min_cuda": 12.4}}', 422),
    ("Authorization not UTF-8", "GET", "/v1/jobs", [(b"Authorization", b"Bearer \xff\xfe\xc3")], b"", 401),
    ("Authorization not UTF-8 to the agents' endpoint", "POST", "/v1/agent/report",
     [(b"Authorization", b"Bearer \xff\xfe\xc3"), (b"X-Gpuhop-Attempt", b"gpuhop-ab-1")], b"{}", 401),
    ("attempt header not UTF-8", "POST", "/v1/agent/report",
     [(b"Authorization", f"Bearer {HEX_TOKEN}".encode()), (b"X-Gpuhop-Attempt", b"gpuhop-\xff-1")], b"{}", 401),
]


@pytest.mark.parametrize("what, method, path, headers, body, expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_4xx_with_a_message(daemon: Daemon, what: str, method: str, path: str,
                                               headers: list[tuple[bytes, bytes]] | None, body: bytes,
                                               expected: int) -> None:
    status, fields, payload = raw(daemon, method, path, auth(daemon) if headers is None else headers, body)
    assert status == expected, (what, payload[:300])
    message = json.loads(payload)["error"]["message"]
    assert message and len(message) < 1000
    assert daemon.client.token not in message


def assert_no_server_error_nor_failed_tick(daemon: Daemon) -> None:
    metrics = daemon.client.request("GET", "/metrics")
    server_errors = re.findall(r'^gpuhop_api_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)$', metrics, re.MULTILINE)
    assert sum(float(v) for v in server_errors) == 0, server_errors
    ticks = re.search(r"^gpuhop_tick_errors_total (\S+)$", metrics, re.MULTILINE)
    assert ticks and float(ticks.group(1)) == 0, daemon.log()
    assert "unhandled error" not in Path(daemon.log_path).read_text(errors="replace")


def test_afterwards_no_5xx_no_failed_tick_and_a_job_still_runs(daemon: Daemon) -> None:
    for _what, method, path, headers, body, _ in CASES:  # in case this test runs alone
        raw(daemon, method, path, auth(daemon) if headers is None else headers, body)
    assert_no_server_error_nor_failed_tick(daemon)
    job = daemon.client.submit(SPEC)
    done = daemon.wait_status(job["id"], {"succeeded", "failed", "cancelled"}, 90)
    assert done["status"] == "succeeded", done
    assert b"still fine" in b"".join(daemon.client.logs(job["id"]))
    assert_no_server_error_nor_failed_tick(daemon)
