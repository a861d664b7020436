"""Shared fixtures: a store on SQLite and on PostgreSQL (skipped with the reason when no server
answers), and a check that no test leaves a child process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_URL = os.environ.get("GPUHOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_available() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[dev]')"
    try:
        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
            return None
    except Exception as exc:
        return f"no PostgreSQL at {PG_URL} ({str(exc).splitlines()[0][:120]}); set GPUHOP_TEST_PG_URL"


_PG_SKIP = _pg_available()


@contextlib.contextmanager
def pg_schema(prefix: str = "t") -> Iterator[str]:
    """A URL to a fresh, empty schema of its own in the test PostgreSQL (skips the test where
    none answers), dropped afterwards."""
    if _PG_SKIP:
        pytest.skip(_PG_SKIP)
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = PG_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gpuhop.db'}"
        return
    with pg_schema() as url:
        yield url


def _children() -> dict[int, str]:
    """Live (not zombie) child processes of this pytest process: pid -> command line."""
    me, out = str(os.getpid()), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if ppid == me and state != "Z":
            out[int(entry)] = cmd[:200]
    return out


@pytest.fixture(autouse=True)
def no_child_left_behind() -> Iterator[None]:
    """A test that starts a process (a daemon, a simulator) must stop it: anything it left is
    given a generous deadline to exit, then killed and reported as this test's error."""
    before = set(_children())
    yield
    deadline = time.monotonic() + 15
    while True:
        left = {pid: cmd for pid, cmd in _children().items() if pid not in before}
        if not left:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pytest.fail(f"the test left child processes behind: {left}")


async def stop_every_machine(adapters: dict[str, Any]) -> None:
    """Fixture teardown for tests that drive an engine by hand: a test that failed before its
    own clean-up must not leave its jobs (re-parented to init, so `no_child_left_behind`
    cannot see them) running on the host."""
    for adapter in adapters.values():
        try:
            instances = await adapter.list_instances()
        except Exception:
            continue
        for inst in instances:
            if inst.state.value != "terminated":
                with contextlib.suppress(Exception):
                    await adapter.terminate(inst.instance_id)
