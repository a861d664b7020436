"""Opening the database: SQLite in WAL mode by default, PostgreSQL by URL, and the Alembic
migrations applied at start-up so the schema is always the one this code expects.

SQLite specifics live here. The database file and its `-wal`/`-shm` companions hold job specs
(commands, environment) and are made readable by their owner only. Transactions are begun
explicitly: pysqlite's own handling starts a transaction only at the first write, so a verb that
reads, decides and then writes would decide on a state another writer may already have changed.
Connections from `write_engine()` begin with `BEGIN IMMEDIATE` (they hold the write lock from
their first read, so read-modify-write is atomic); reads begin a plain deferred transaction and,
in WAL mode, never wait for writers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlmodel import create_engine

MIGRATIONS = Path(__file__).with_name("migrations")
WRITE_OPTION = "gpuhop_write"  # execution option: this connection's transactions will write
FILE_MODE = 0o600
BUSY_TIMEOUT_SECONDS = 30.0  # how long a SQLite writer waits for the write lock
MIGRATION_LOCK = 0x67707568  # "gpuh": PostgreSQL advisory lock held while migrating


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None (not SQLite, or in memory)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("sqlite:///", 1)[-1].split("?", 1)[0]
    if not path or path == ":memory:" or url == path:
        return None
    return Path(path)


def private_files(db: Path) -> None:
    """Create the database file owner-only if absent (SQLite gives its -wal and -shm files the
    mode of the database file) and tighten the three files if an older version left them 0644."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # an empty file is an empty database
        os.close(os.open(db, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if f.stat().st_mode & 0o777 != FILE_MODE:
                f.chmod(FILE_MODE)


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            private_files(path)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_SECONDS})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # no implicit BEGIN: _begin below says which kind
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
            cur.close()
            if path is not None:  # WAL mode just made the companions: keep them owner-only
                private_files(path)

        # This process's writers queue for SQLite's one write lock here, not in SQLite: a writer
        # that finds the database locked sleeps in SQLite's busy handler (1, 2, 5, 10, 15 ms...)
        # and is not woken when the lock is freed. With the engine's writes and a thousand
        # submits a second, those sleeps were most of the submits' p99 (issue 9). Other
        # processes on the same file still meet the busy handler.
        # a plain lock (any thread may release it: a pool may roll a connection back elsewhere),
        # waited for as long as SQLite's busy_timeout would
        writers = threading.Lock()
        holders: set[int] = set()  # id() of the DBAPI connections holding `writers`

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            if not conn.get_execution_options().get(WRITE_OPTION, False):
                conn.exec_driver_sql("BEGIN")
                return
            if not writers.acquire(timeout=BUSY_TIMEOUT_SECONDS):
                raise sqlite3.OperationalError("database is locked (another writer of this process held it "
                                               f"for {BUSY_TIMEOUT_SECONDS:.0f} s)")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                writers.release()
                raise
            holders.add(id(conn.connection.dbapi_connection))

        # released once COMMIT or ROLLBACK has run (the "commit" event comes before it: a writer
        # let in then would still find the database locked)
        dialect = engine.dialect
        do_commit, do_rollback = dialect.do_commit, dialect.do_rollback

        def _ending(end: Any) -> Any:
            def run(conn: Any) -> None:  # the pool's proxy, or the DBAPI connection itself
                try:
                    end(conn)
                finally:
                    key = id(getattr(conn, "dbapi_connection", conn))
                    if key in holders:
                        holders.discard(key)
                        writers.release()
            return run

        dialect.do_commit = _ending(do_commit)  # type: ignore[method-assign]
        dialect.do_rollback = _ending(do_rollback)  # type: ignore[method-assign]
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def write_engine(engine: Engine) -> Engine:
    """The same engine and pool, for transactions that write (see the module docstring)."""
    return engine.execution_options(**{WRITE_OPTION: True})


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is already there)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with write_engine(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            # replicas starting together: one migrates, the others wait and then find it done
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
