"""Upgrading a database written by schema 0001 (the preemption aggregate is back-filled, jobs that
the old race let share a volume are untangled so the new index can be built), and the SQLite
files are readable by their owner only."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text

from orchestrator.models import JobSpec
from orchestrator.store import Conflict, Store
from orchestrator.store.db import MIGRATIONS, write_engine


def migrate_to(store: Store, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with write_engine(store.engine).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


@pytest.fixture
def old_store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    migrate_to(s, "0001")
    yield s
    s.close()


JOB = ("INSERT INTO jobs (id, name, spec_json, status, volume_name, cancel_requested, relaunches, retries, "
       "message, created_at, updated_at) VALUES (:id, 't', :spec, :status, :vol, false, 0, 0, '', :at, :at)")
ATTEMPT = ("INSERT INTO attempts (job_id, number, name, provider, region, offer_id, capacity, gpu_count, "
           "price_per_hour, status, end_reason, detail, agent_state, sigterm_received, placement_reason, "
           "created_at, launched_at, running_at, ended_at, cost_usd) VALUES (:job, :n, :name, :p, '', '', :c, 0, "
           "0, :status, :reason, '', '', false, '', 0, :launched, :running, :ended, 0)")


def test_0002_backfills_history_and_untangles_shared_volumes(old_store: Store) -> None:
    now = time.time()
    spec = JobSpec.model_validate({"name": "t", "command": ["true"], "volume": {"name": "v", "size_gb": 1}})
    with old_store.engine.begin() as conn:
        for job_id, status, at in [("old", "running", 1.0), ("new", "recovering", 2.0), ("done", "failed", 0.5),
                                   ("b", "running", 3.0)]:
            conn.execute(text(JOB), {"id": job_id, "spec": spec.model_dump_json(), "status": status,
                                     "vol": "v" if job_id != "b" else "w", "at": at})
        h = 3600.0
        rows = [  # provider, capacity, status, end_reason, launched, running, ended
            ("runpod", "spot", "ended", "preempted", now - 5 * h, now - 4 * h, now - 2 * h),
            ("runpod", "spot", "ended", "preempted", now - 3 * h, None, now - 2 * h),
            ("runpod", "spot", "ended", "lost", now - 3 * h, now - 2 * h, None),  # no end time: 0 h
            ("aws", "on-demand", "ended", "succeeded", now - 2 * h, now - 2 * h, now - 1 * h),
            ("aws", "on-demand", "ended", "no_capacity", None, None, now),  # never launched
            ("aws", "spot", "ended", "no_capacity", None, None, now),  # never launched at all here
            ("aws", "on-demand", "running", None, now - h, now - h, None),  # live: added at read time
        ]
        for n, (p, c, st, reason, launched, running, ended) in enumerate(rows, 1):
            conn.execute(text(ATTEMPT), {"job": "old", "n": n, "name": f"g-old-{n}", "p": p, "c": c, "status": st,
                                         "reason": reason, "launched": launched, "running": running, "ended": ended})
    old_store.migrate()  # 0001 -> head, as a daemon upgrade does at start

    hist = {(p, c): (n, hours) for p, c, n, hours in old_store.preemption_history()}
    assert hist.keys() == {("runpod", "spot"), ("aws", "on-demand")}
    assert hist[("runpod", "spot")] == (2, pytest.approx(2.0 + 1.0))
    assert hist[("aws", "on-demand")][0] == 0
    assert hist[("aws", "on-demand")][1] == pytest.approx(1.0 + 1.0, abs=0.1)

    jobs = {j.id: j for j in old_store.list_jobs()}
    assert (jobs["old"].volume_name, jobs["new"].volume_name, jobs["done"].volume_name) == ("v", None, "v")
    assert jobs["new"].status == "recovering"  # it runs on; only the claim moved
    assert [(e.kind, e.message) for e in old_store.events("new")] == [
        ("volume_shared", "volume 'v' is also claimed by the older job old; this job keeps using it but no "
                          "longer holds it (upgrade to schema 0002)")]
    with pytest.raises(Conflict, match="volume 'v' is in use by job old"):
        old_store.create_job("next", spec)
    # the new columns exist with their defaults on old rows
    a = old_store.attempts("old")[0]
    assert (a.bill_started_at, a.bill_ended_at, a.cost_final, a.duplicate_cost_usd) == (None, None, False, 0.0)
    old_store.migrate()  # and a second start changes nothing


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask: what a plain open() would make is 0644
    yield
    os.umask(old)


def test_a_new_sqlite_database_and_its_wal_files_are_owner_only(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "state" / "gpuhop.db"
    store = Store(f"sqlite:///{db}")
    try:
        store.migrate()
        store.create_job("j1", JobSpec.model_validate({"name": "t", "command": ["true"]}))
        assert all(f.exists() for f in _files(db))  # WAL mode, connection open
        assert {f.name: oct(_mode(f)) for f in _files(db)} == {f.name: "0o600" for f in _files(db)}
    finally:
        store.close()


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "gpuhop.db"
    conn = sqlite3.connect(db)  # as an older gpuhop left it: 0644, in WAL mode, companions present
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    assert all(f.exists() and _mode(f) == 0o644 for f in _files(db))
    store = Store(f"sqlite:///{db}")
    try:
        store.migrate()
        assert {f.name: oct(_mode(f)) for f in _files(db)} == {f.name: "0o600" for f in _files(db)}
    finally:
        store.close()
        conn.close()
