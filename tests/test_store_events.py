"""The event log stays small: repeats of a waiting state fold into one row, and the events of jobs
that ended long ago are pruned in batches. And the preemption history placement reads is an
aggregate kept in step with the attempts, equal to what scanning every attempt would give."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, col, select

from orchestrator.models import AttemptStatus, EndReason, JobSpec
from orchestrator.store import AttemptRow, EventRow, Store


def spec() -> JobSpec:
    return JobSpec.model_validate({"name": "t", "command": ["true"]})


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url, event_retention_days=30)
    s.migrate()
    yield s
    s.close()


def log(store: Store, job_id: str) -> list[tuple[str, int | None, str, int]]:
    return [(e.kind, e.attempt, e.message, e.repeats) for e in store.events(job_id)]


def test_repeats_of_a_waiting_state_update_the_latest_event(store: Store) -> None:
    store.create_job("j1", spec())
    for i in range(3):  # every backoff try, as the engine writes it
        store.apply("j1", {"message": f"no capacity {i}"}, {}, [(None, "no_capacity", f"nothing launched ({i})")])
    first = store.events("j1")[-1]
    store.add_event("j1", "no_capacity", "nothing launched (3)")
    assert store.events("j1")[-1].at >= first.at
    assert log(store, "j1") == [("submitted", None, "job 't' submitted", 0),
                                ("no_capacity", None, "nothing launched (3)", 3)]
    # something else in between starts a new row; so does another attempt's retry
    store.add_event("j1", "launch_retry", "attempt 1 unconfirmed", 1)
    store.add_event("j1", "launch_retry", "attempt 1 unconfirmed again", 1)
    store.add_event("j1", "launch_retry", "attempt 2 unconfirmed", 2)
    store.add_event("j1", "no_capacity", "nothing launched (4)")
    # kinds that are news each time are never folded, even in one apply
    store.apply("j1", {}, {}, [(None, "cancel", "a"), (None, "cancel", "b"),
                               (None, "provider_degraded", "x"), (None, "provider_degraded", "y")])
    assert log(store, "j1")[2:] == [
        ("launch_retry", 1, "attempt 1 unconfirmed again", 1),
        ("launch_retry", 2, "attempt 2 unconfirmed", 0),
        ("no_capacity", None, "nothing launched (4)", 0),
        ("cancel", None, "a", 0), ("cancel", None, "b", 0),
        ("provider_degraded", None, "y", 1),
    ]


def _age_events(store: Store, job_id: str, at: float) -> None:
    with Session(store.engine) as s:
        s.execute(update(EventRow).where(col(EventRow.job_id) == job_id).values(at=at))
        s.commit()


def test_prune_deletes_old_events_of_ended_jobs_only_in_batches(store: Store) -> None:
    now = time.time()
    old = now - 31 * 86400
    store.create_job("ended", spec())
    store.create_job("active", spec())
    for i in range(7):
        store.add_event("ended", "note", f"old {i}")
        store.add_event("active", "note", f"old {i}")
    _age_events(store, "ended", old)
    _age_events(store, "active", old)
    store.update_job("ended", status="succeeded")
    store.add_event("ended", "note", "recent")  # within the retention: kept
    assert store.prune(now, batch_size=3, max_batches=2) == 6  # bounded: 2 batches of 3
    assert store.prune(now, batch_size=3, max_batches=2) == 2  # the rest (7 notes + submitted = 8)
    assert store.prune(now, batch_size=3) == 0
    assert [e.message for e in store.events("ended")] == ["recent"]
    assert len(store.events("active")) == 8  # a job still running keeps its whole history


def test_retention_comes_from_the_store_setting(db_url: str) -> None:
    store = Store(db_url, event_retention_days=2)
    try:
        store.migrate()
        store.create_job("j1", spec())
        store.update_job("j1", status="failed")
        assert store.prune(time.time() + 1.5 * 86400) == 0
        assert store.prune(time.time() + 2.5 * 86400) == 1
    finally:
        store.close()


def full_scan(store: Store) -> dict[tuple[str, str], tuple[int, float]]:
    """What preemption_history returned before the aggregate: every launched attempt, scanned."""
    now = time.time()
    agg: dict[tuple[str, str], list[float]] = {}
    with Session(store.engine) as s:
        for row in s.exec(select(AttemptRow).where(col(AttemptRow.launched_at).is_not(None))):
            slot = agg.setdefault((row.provider, row.capacity), [0, 0.0])
            slot[0] += row.end_reason == EndReason.PREEMPTED.value
            slot[1] += max(0.0, (row.ended_at or now) - (row.running_at or row.launched_at or now)) / 3600.0
    return {k: (int(v[0]), v[1]) for k, v in agg.items()}


def as_dict(rows: list[tuple[str, str, int, float]]) -> dict[tuple[str, str], tuple[int, float]]:
    return {(p, c): (n, h) for p, c, n, h in rows}


def assert_same_history(store: Store) -> None:
    want, got = full_scan(store), as_dict(store.preemption_history())
    assert got.keys() == want.keys()
    for key, (n, hours) in want.items():
        assert got[key][0] == n, key
        assert got[key][1] == pytest.approx(hours, abs=0.1), key  # live attempts keep running


def test_the_preemption_aggregate_equals_a_scan_of_every_attempt(store: Store) -> None:
    now = time.time()
    made: list[AttemptRow] = []
    shapes = [("runpod", "spot", 5.0, 4.0), ("runpod", "spot", 3.0, None), ("aws", "spot", 2.0, 1.5),
              ("aws", "on-demand", 1.0, 0.5), ("local", "on-demand", None, None)]
    for n, (provider, capacity, launched_h, running_h) in enumerate(shapes, 1):  # a job each: one live attempt per job
        store.create_job(f"j{n}", spec())
        made.append(store.add_attempt(AttemptRow(
            job_id=f"j{n}", number=1, name=f"g-j{n}-1", provider=provider, capacity=capacity, status="running",
            created_at=now - 6 * 3600, launched_at=None if launched_h is None else now - launched_h * 3600,
            running_at=None if running_h is None else now - running_h * 3600,
        )))
    assert_same_history(store)  # all live
    a1, a2, a3, a4, a5 = made
    store.apply("j1", {}, {a1.id: {"status": "ended", "end_reason": "preempted", "ended_at": now - 3600}}, [])
    store.apply("j3", {}, {a3.id: {"status": "ended", "end_reason": "lost", "ended_at": now}}, [])
    store.update_attempt(a2.id, status="ended", end_reason="preempted", ended_at=now)
    store.update_attempt(a5.id, status="ended", end_reason="no_capacity", ended_at=now)  # never launched
    assert_same_history(store)
    got = as_dict(store.preemption_history())
    assert got[("runpod", "spot")] == (2, pytest.approx(3.0 + 3.0))
    assert ("local", "on-demand") not in got
    # writes after the end (billing) do not count the attempt again
    store.update_attempt(a1.id, cost_usd=3.0, cost_final=True)
    store.apply("j1", {}, {a1.id: {"status": "ended", "end_reason": "preempted", "ended_at": now}}, [])
    assert as_dict(store.preemption_history())[("runpod", "spot")] == (2, pytest.approx(6.0))
    assert_same_history(store)  # a1 kept its first end, so a scan agrees
    got_a4 = as_dict(store.preemption_history())[("aws", "on-demand")]
    assert got_a4[0] == 0 and got_a4[1] == pytest.approx(0.5, abs=0.1)


def test_a_batch_writes_what_one_write_at_a_time_would(store: Store, tmp_path: Path) -> None:
    """apply_many writes job-only items with a few Core statements and decides the events'
    coalescing itself; applied one by one through `apply` (the ORM path) the same items must
    leave the same jobs and the same event log, repeats folded the same way, within one
    batch as well as into rows written before it."""
    other = Store(f"sqlite:///{tmp_path / 'one_by_one.db'}")
    other.migrate()
    rng = random.Random(7)
    ids = [f"j{i}" for i in range(12)]
    for s in (store, other):
        for job_id in ids:
            s.create_job(job_id, spec(), now=1000.0)
            s.add_attempt(AttemptRow(job_id=job_id, number=1, name=f"gpuhop-{job_id}-1", provider="fake",
                                     capacity="spot", status=AttemptStatus.RUNNING.value, created_at=1000.0,
                                     launched_at=1000.0, running_at=1001.0))
        s.add_event("j0", "no_capacity", "before the batch")  # a row the batch's repeats fold into
    attempt_ids = {a.job_id: a.id for j in ids for a in store.attempts(j)}
    assert attempt_ids == {a.job_id: a.id for j in ids for a in other.attempts(j)}
    ended = {"status": AttemptStatus.ENDED.value, "end_reason": EndReason.PREEMPTED.value, "ended_at": 1500.0}
    attempt_writes = [  # forward, backward (stale snapshots) and ending twice: merge_attempt's rules
        {}, {}, {"last_heartbeat_at": 1200.0}, {"last_heartbeat_at": 1100.0, "agent_state": "started"},
        {"agent_state": ""}, {"exit_code": 3}, {"cost_usd": 0.25}, {"cost_usd": 0.5, "cost_final": True},
        ended, {**ended, "end_reason": EndReason.LOST.value, "ended_at": 1600.0},
        {"status": AttemptStatus.RUNNING.value},
    ]
    kinds = ["no_capacity", "no_capacity", "launch_retry", "note"]
    for round_ in range(4):
        # j0: repeats that fold into the row written before the batch (or by the batch before);
        # j1: ended, then a stale snapshot's "running" whose event must be dropped with it
        batch = [("j0", {}, {}, [(None, "no_capacity", "a"), (None, "no_capacity", "b"), (None, "no_capacity", "c")]),
                 ("j1", {}, {attempt_ids["j1"]: ended if round_ == 0 else {"status": AttemptStatus.RUNNING.value}},
                  [(1, "note", f"attempt 1, round {round_}"), (None, "note", f"job, round {round_}")])]
        for job_id in rng.sample(ids[2:], 8):
            fields = rng.choice([{}, {"message": f"m{rng.random():.3f}"}, {"message": "x", "relaunches": rng.randint(0, 3)}])
            events = [(rng.choice([None, 1]), rng.choice(kinds), f"e{rng.random():.3f}") for _ in range(rng.randint(0, 3))]
            write = rng.choice(attempt_writes)
            batch.append((job_id, fields, {attempt_ids[job_id]: write} if write else {}, events))
        assert store.apply_many(batch) == set()
        for job_id, fields, attempts, events in batch:
            other.apply(job_id, fields, attempts, events)

    def jobs(s: Store) -> list[tuple[str, str, int]]:
        return sorted((j.id, j.message, j.relaunches) for j in s.list_jobs(limit=100))

    assert jobs(store) == jobs(other)
    assert sum(r for j in ids for *_, r in log(store, j)) > 0, "the trial folded no repeat: it proves nothing"
    for job_id in ids:
        assert log(store, job_id) == log(other, job_id), job_id
        # `changed` is a position in each database's own commit order (migration 0009): not comparable
        assert ([a.model_dump(exclude={"changed"}) for a in store.attempts(job_id)]
                == [a.model_dump(exclude={"changed"}) for a in other.attempts(job_id)])
    def history(s: Store) -> list[tuple[str, str, int, float]]:  # hours to 36 s: each store ran at its own now
        return [(p, c, n, round(h, 2)) for p, c, n, h in s.preemption_history()]

    assert history(store) == history(other)  # the preemption aggregate, counted once per end
    assert sum(a.status == AttemptStatus.ENDED.value for j in ids for a in store.attempts(j)) > 2
    other.close()
