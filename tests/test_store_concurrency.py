"""The store under concurrent writers, on SQLite and PostgreSQL: one unfinished job per volume
whatever the timing, writes from stale snapshots that never move an attempt backwards, each ended
attempt counted once in the preemption aggregate, store calls that never queue behind provider
SDK calls in the loop's default executor, and a volume deletion that no submit can slip past."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from orchestrator.models import AttemptStatus, EndReason, JobSpec, JobStatus
from orchestrator.store import AttemptRow, Conflict, JobRow, Store
from orchestrator.store.repo import NewJob
from orchestrator.store.submits import SubmitQueue
from orchestrator.store.tables import TERMINAL_JOB_STATUSES

THREADS = 20
BURSTS = 5


def spec(volume: str | None = None) -> JobSpec:
    extra = {"volume": {"name": volume, "size_gb": 10}} if volume else {}
    return JobSpec.model_validate({"name": "t", "command": ["true"], **extra})


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    s.migrate()
    yield s
    s.close()


def at_once(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Call fn(0..n-1) from n threads released together; each result or the exception raised."""
    gate = threading.Barrier(n)

    def one(i: int) -> Any:
        gate.wait(timeout=120)
        try:
            return fn(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_the_index_predicate_names_exactly_the_terminal_statuses() -> None:
    assert set(TERMINAL_JOB_STATUSES) == {s.value for s in JobStatus if s.terminal}


def test_concurrent_submissions_on_one_volume_record_exactly_one(store: Store) -> None:
    ends = ["succeeded", "failed", "cancelled"]
    for burst in range(BURSTS):
        results = at_once(THREADS, lambda i, b=burst: store.create_job(f"j{b}-{i}", spec("shared")))  # type: ignore[misc]
        winners = [r for r in results if isinstance(r, JobRow)]
        losers = [r for r in results if not isinstance(r, JobRow)]
        assert len(winners) == 1, f"burst {burst}: {len(winners)} jobs recorded on one volume"
        assert all(isinstance(r, Conflict) for r in losers), losers
        winner = winners[0].id
        assert all(f"volume 'shared' is in use by job {winner}" in str(r) for r in losers), losers
        assert [j.id for j in store.active_jobs()] == [winner]
        # the job ends (as the engine ends it): the volume is free for the next burst
        store.apply(winner, {"status": ends[burst % 3]}, {}, [])
    assert len(store.list_jobs()) == BURSTS
    assert [v.name for v in store.list_volumes()] == ["shared"]


def test_a_batch_of_submits_takes_back_only_the_refused_ones(store: Store) -> None:
    """Group commit (Store.create_jobs): one transaction, a savepoint per job. Within one batch
    a second job on a volume, a job id already taken and a job on a volume being deleted are
    refused with their own reasons; every other job of the batch is recorded."""
    store.create_job("old", spec())
    store.create_job("gone", spec("deleting"))
    store.update_job("gone", status="cancelled")
    assert store.begin_volume_delete("deleting", "tok") is not None
    batch = [NewJob("a", spec("v")), NewJob("b", spec("v")), NewJob("c", spec()), NewJob("old", spec("w")),
             NewJob("d", spec("deleting")), NewJob("e", spec("w"))]
    results = store.create_jobs(batch)
    assert [isinstance(r, Conflict) for r in results] == [False, True, False, True, True, False]
    assert [r.id for r in results if not isinstance(r, Conflict)] == ["a", "c", "e"]
    assert "volume 'v' is in use by job a" in str(results[1])
    assert isinstance(results[3], Conflict) and results[3].code == "job_exists"
    assert isinstance(results[4], Conflict) and results[4].code == "volume_deleting"
    assert sorted(j.id for j in store.list_jobs()) == ["a", "c", "e", "gone", "old"]
    # the refused job 'old' (its id was taken) did not take volume 'w' with it: 'e' holds it
    assert {j.id: j.volume_name for j in store.active_jobs()} == {"a": "v", "c": None, "e": "w", "old": None}
    submitted = {j: sum(e.kind == "submitted" for e in store.events(j)) for j in ("a", "b", "c", "d", "e", "old")}
    assert submitted == {"a": 1, "b": 0, "c": 1, "d": 0, "e": 1, "old": 1}  # events only for what was recorded


def test_submits_racing_through_the_queue_record_one_job_per_volume(store: Store) -> None:
    """The API's path: many submits at once go through SubmitQueue in a few transactions; of the
    ones naming one volume exactly one is recorded, and every submit hears its own answer."""
    async def race() -> tuple[list[object], int]:
        queue = SubmitQueue(store)
        calls = [queue.create(f"q{i}", spec("shared" if i % 2 else None), True) for i in range(60)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return results, queue.batches

    results, batches = asyncio.run(race())
    shared = [r for i, r in enumerate(results) if i % 2]
    plain = [r for i, r in enumerate(results) if not i % 2]
    assert all(not isinstance(r, (Conflict, BaseException)) for r in plain), plain
    winners = [r for r in shared if not isinstance(r, (Conflict, BaseException))]
    assert len(winners) == 1 and all(isinstance(r, Conflict) for r in shared if r is not winners[0])
    assert batches < 60, "the submits were not grouped: one transaction each"
    assert len(store.list_jobs()) == 31


def test_the_database_itself_refuses_a_second_unfinished_job_on_a_volume(store: Store) -> None:
    """Not the store's code: a row written past it (another daemon version, a script) is refused."""
    def row(job_id: str, status: str, volume: str | None) -> JobRow:
        return JobRow(id=job_id, name="t", spec_json="{}", status=status, volume_name=volume,
                      created_at=time.time(), updated_at=time.time())

    with Session(store.engine) as s:
        for i, status in enumerate(TERMINAL_JOB_STATUSES):  # any number of ended jobs
            s.add(row(f"done{i}", status, "v"))
        s.add(row("a", "running", "v"))
        s.add(row("n1", "running", None))  # and of jobs without a volume
        s.add(row("n2", "queued", None))
        s.commit()
    for status in ("queued", "recovering"):
        with Session(store.engine) as s, pytest.raises(IntegrityError):
            s.add(row("b", status, "v"))
            s.commit()
    with pytest.raises(Conflict, match="volume 'v' is in use by job a"):
        store.create_job("c", spec("v"))
    with pytest.raises(Conflict, match="held by another unfinished job"):
        store.update_job("done0", status="recovering")
    store.update_job("a", status="cancelled")
    store.create_job("c", spec("v"))
    assert {j.id for j in store.active_jobs()} == {"c", "n1", "n2"}


def _job_with_attempt(store: Store, job_id: str, status: str = "running") -> AttemptRow:
    store.create_job(job_id, spec())
    now = time.time()
    return store.add_attempt(AttemptRow(
        job_id=job_id, number=1, name=f"g-{job_id}-1", provider="runpod", capacity="spot", status=status,
        created_at=now - 7200, launched_at=now - 7200, running_at=now - 3600, instance_id="i-1",
    ))


def test_a_stale_engine_write_keeps_what_the_agent_reported_meanwhile(db_url: str) -> None:
    engine_side, api_side = Store(db_url), Store(db_url)  # two daemons' worth of sessions
    try:
        engine_side.migrate()
        row = _job_with_attempt(engine_side, "j1")
        api_side.update_attempt(row.id, agent_state="started", last_heartbeat_at=1000.0)
        snap = engine_side.attempts("j1")[0]  # the engine reads, then observes providers...
        # ...while the agent's exit report lands
        api_side.update_attempt(row.id, agent_state="exited", exit_code=0, exit_signal=None,
                                sigterm_received=True, last_heartbeat_at=2000.0)
        # the engine writes back from its snapshot: heartbeat, state and exit fields are older
        stale = engine_side.apply("j1", {}, {row.id: {
            "agent_state": snap.agent_state, "last_heartbeat_at": snap.last_heartbeat_at,
            "exit_code": snap.exit_code, "sigterm_received": snap.sigterm_received,
            "status": AttemptStatus.ENDED.value, "end_reason": EndReason.LOST.value, "ended_at": time.time(),
        }}, [(1, "lost", "attempt 1 lost")])
        got = api_side.attempts("j1")[0]
        assert (got.agent_state, got.exit_code, got.sigterm_received, got.last_heartbeat_at) == (
            "exited", 0, True, 2000.0)
        assert got.status == "ended" and got.end_reason == "lost"  # the rest of the write stands
        assert stale == {row.id}
        # a heartbeat that is newer does go through
        api_side.update_attempt(row.id, last_heartbeat_at=3000.0)
        assert engine_side.attempts("j1")[0].last_heartbeat_at == 3000.0
    finally:
        engine_side.close()
        api_side.close()


def test_an_ended_attempt_stays_ended_and_keeps_its_first_end(store: Store) -> None:
    row = _job_with_attempt(store, "j1")
    snap = store.attempts("j1")[0]  # running, as a slow tick saw it
    store.apply("j1", {}, {row.id: {"status": "ended", "end_reason": "succeeded", "ended_at": 100.0,
                                    "detail": "exit 0", "cost_usd": 1.0}}, [(1, "succeeded", "attempt 1 succeeded")])
    # the slow tick, from its snapshot, marks it running, then ends it differently
    stale = store.apply("j1", {}, {snap.id: {"status": "running", "running_at": 200.0}}, [(1, "running", "again")])
    assert stale == {row.id}
    stale = store.apply("j1", {}, {snap.id: {"status": "ended", "end_reason": "lost", "ended_at": 300.0,
                                             "detail": "gone", "cost_usd": 2.0}}, [(1, "lost", "attempt 1 lost")])
    assert stale == {row.id}
    got = store.attempts("j1")[0]
    assert (got.status, got.end_reason, got.ended_at, got.detail, got.cost_usd) == (
        "ended", "succeeded", 100.0, "exit 0", 1.0)
    # the transitions that did not happen are not in the log either
    assert [e.kind for e in store.events("j1")] == ["submitted", "succeeded"]
    # billing still lands on an ended attempt; an estimate never replaces the final bill
    store.update_attempt(row.id, cost_usd=1.25, cost_final=True, bill_started_at=50.0, bill_ended_at=101.0)
    store.apply("j1", {}, {row.id: {"cost_usd": 1.5}}, [])
    got = store.attempts("j1")[0]
    assert (got.cost_usd, got.cost_final, got.bill_ended_at) == (1.25, True, 101.0)


def test_an_attempt_ended_by_two_writers_at_once_is_counted_once(store: Store) -> None:
    rounds = 6
    for n in range(rounds):
        row = _job_with_attempt(store, f"j{n}")
        fields = {"status": "ended", "end_reason": EndReason.PREEMPTED.value, "ended_at": row.running_at + 3600}
        results = at_once(4, lambda _i, r=row, f=fields: store.apply(  # type: ignore[misc]
            r.job_id, {}, {r.id: dict(f)}, [(1, "preempted", "attempt 1 preempted")]))
        assert [r for r in results if isinstance(r, Exception)] == []  # e.g. SQLite's busy snapshot
        assert sorted(len(r) for r in results) == [0, 1, 1, 1], results  # one ends it, three are stale
        events = [e.kind for e in store.events(row.job_id)]
        assert events.count("preempted") == 1, events
    assert store.preemption_history() == [("runpod", "spot", rounds, pytest.approx(rounds * 1.0))]


async def test_store_calls_do_not_wait_behind_the_default_executor(tmp_path: Path) -> None:
    """Provider SDK threads fill the loop's default executor; the store has its own."""
    store = Store(f"sqlite:///{tmp_path / 'gpuhop.db'}")
    store.migrate()
    loop = asyncio.get_running_loop()
    default = ThreadPoolExecutor(1)
    loop.set_default_executor(default)
    release = threading.Event()
    blocker = loop.run_in_executor(None, release.wait, 300)  # a slow boto3 call, say
    try:
        store.create_job("j1", spec())
        counts = await asyncio.wait_for(store.run(store.counts_by_status), 120)  # a generous deadline
        assert counts == {"queued": 1}
    finally:
        release.set()
        await blocker
        store.close()


def _attempt(job_id: str, number: int, **kw: Any) -> AttemptRow:
    return AttemptRow(job_id=job_id, number=number, name=f"gpuhop-{job_id}-{number}", provider="fake", region="r1",
                      offer_id="o", capacity="on-demand", gpu="RTX-4090", gpu_count=1, price_per_hour=1.0,
                      status=AttemptStatus.PENDING.value, created_at=time.time(), **kw)


def test_a_job_never_gets_a_second_live_attempt_even_from_racing_writers(store: Store) -> None:
    """The engine's guard against stale ticks, kept again by the database: of many writers
    recording a new attempt of one job at once, one wins; the rest are refused (Conflict)."""
    store.create_job("j1", spec("v1"))
    results = at_once(THREADS, lambda i: store.add_attempt(_attempt("j1", i + 1)))
    won = [r for r in results if isinstance(r, AttemptRow)]
    assert len(won) == 1, results
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, AttemptRow)), results
    assert [a.number for a in store.attempts("j1")] == [won[0].number]


def test_an_early_replacement_may_start_beside_a_warned_attempt_only(store: Store) -> None:
    store.create_job("j1", spec("v1"))
    first = store.add_attempt(_attempt("j1", 1))
    with pytest.raises(Conflict):
        store.add_attempt(_attempt("j1", 2))
    store.update_attempt(first.id or 0, interruption_at=time.time())  # a reclaim notice
    store.add_attempt(_attempt("j1", 2))
    with pytest.raises(Conflict):  # but not a third
        store.add_attempt(_attempt("j1", 3))
    store.update_attempt(first.id or 0, status=AttemptStatus.ENDED.value, end_reason=EndReason.PREEMPTED.value,
                         ended_at=time.time())
    assert [a.number for a in store.attempts("j1")] == [1, 2]


# ----------------------------------------------------------------------------- deleting volumes


def _used(store: Store, job_id: str, volume: str, status: str = "failed", at: float | None = None,
          reuse: bool = True) -> JobRow:
    """A job that named `volume` and has ended with `status`."""
    job = store.create_job(job_id, spec(volume), at, reuse_volume=reuse)
    store.apply(job_id, {"status": status}, {}, [])
    return job


def test_a_volume_is_claimed_for_deletion_only_while_no_unfinished_job_names_it(store: Store) -> None:
    store.create_job("j1", spec("v"))
    with pytest.raises(Conflict, match="volume 'v' is in use by job j1") as refused:
        store.begin_volume_delete("v", "t1")
    assert refused.value.code == "volume_in_use"
    store.apply("j1", {"status": "cancelled"}, {}, [])
    claimed = store.begin_volume_delete("v", "t1")
    assert claimed is not None and claimed.deleting_token == "t1"
    with pytest.raises(Conflict, match="volume 'v' is being deleted") as refused:
        store.create_job("j2", spec("v"))  # a submit naming a volume being deleted
    assert refused.value.code == "volume_deleting" and store.get_job("j2") is None
    with pytest.raises(Conflict, match="already being deleted"):
        store.begin_volume_delete("v", "t2")
    assert not store.finish_volume_delete("v", "t2", "not mine")
    assert store.finish_volume_delete("v", "t1", "asked to")
    assert store.volume("v") is None
    assert [(e.kind, e.message) for e in store.events("j1")][-1] == ("volume_deleted", "volume 'v' deleted: asked to")
    assert store.begin_volume_delete("v", "t3") is None  # gone: nothing to claim
    assert store.get_job("j1").volume_name is None  # type: ignore[union-attr]  # it let go of the name
    store.create_job("j3", spec("v"))  # the name is free again: a new, empty volume
    assert store.volume_usage()["v"][:2] == (1, "j3")  # j1 used the old one


def test_an_interrupted_deletion_is_taken_over_and_a_refused_one_given_back(store: Store) -> None:
    _used(store, "j1", "v")
    now = time.time()
    store.begin_volume_delete("v", "dead", now - 1000)  # a deleter that died 1000 s ago
    assert store.volumes_to_sweep(None, now - 300) == [("v", True)]
    assert store.begin_volume_delete("v", "alive", now, lease_seconds=300) is not None
    store.abort_volume_delete("v", "dead")  # the dead one's late answer changes nothing
    assert not store.finish_volume_delete("v", "dead", "late")
    assert store.volume("v").deleting_token == "alive"  # type: ignore[union-attr]
    assert store.volumes_to_sweep(None, now - 300) == []
    store.abort_volume_delete("v", "alive")  # the provider refused: the volume is usable again
    assert store.volume("v").deleting_token is None  # type: ignore[union-attr]
    store.create_job("j2", spec("v"))


def test_a_deletion_racing_submits_never_leaves_a_live_job_on_a_deleted_volume(store: Store) -> None:
    """One thread deletes the volume (claim, then remove the row) while the others submit jobs
    naming it: either a submit won (the deletion is refused) or the deletion won (every submit
    before its end is refused, and one after it gets a new, empty volume)."""
    for burst in range(BURSTS):
        name = f"race{burst}"
        _used(store, f"seed{burst}", name)
        old = store.volume(name)
        assert old is not None
        deleter = burst % THREADS

        def one(i: int, name: str = name, burst: int = burst, deleter: int = deleter) -> Any:
            if i != deleter:
                return store.create_job(f"r{burst}-{i}", spec(name))
            if store.begin_volume_delete(name, "rm") is None:
                return "gone"
            assert store.finish_volume_delete(name, "rm", "race")
            return "deleted"

        results = at_once(THREADS, one)
        outcome = results[deleter]
        jobs = [r for i, r in enumerate(results) if i != deleter and isinstance(r, JobRow)]
        refused = [r for i, r in enumerate(results) if i != deleter and not isinstance(r, JobRow)]
        assert all(isinstance(r, Conflict) for r in refused), refused
        assert len(jobs) <= 1, f"burst {burst}: {len(jobs)} unfinished jobs on one volume"
        live = [j for j in store.active_jobs() if j.volume_name == name]
        now_vol = store.volume(name)
        if outcome == "deleted":
            for job in live:  # submitted after the row went: a new volume, not the deleted one
                # (a new row: SQLite may give it the old id, never the old creation time)
                assert now_vol is not None and now_vol.created_at > old.created_at
                assert now_vol.deleting_token is None
                assert now_vol.created_at <= job.created_at
            assert not live or now_vol is not None
        else:
            assert isinstance(outcome, Conflict) and outcome.code == "volume_in_use", outcome
            assert len(live) == 1 and now_vol is not None and now_vol.created_at == old.created_at
        for job in live:
            store.apply(job.id, {"status": "cancelled"}, {}, [])


def test_a_volume_whose_last_job_succeeded_is_reused_only_when_asked(store: Store) -> None:
    t = time.time() - 100
    _used(store, "a", "v", "succeeded", t, reuse=False)
    with pytest.raises(Conflict, match=r"holds the final state of job a .*--reuse-volume") as refused:
        store.create_job("b", spec("v"), t + 1, reuse_volume=False)
    assert refused.value.code == "volume_finished" and "gpuhop volume rm v" in str(refused.value)
    assert store.get_job("b") is None
    _used(store, "b", "v", "failed", t + 2, reuse=True)  # asked: it runs on the final state
    _used(store, "c", "v", "succeeded", t + 3, reuse=False)  # the newest ended failed: resuming is the point
    with pytest.raises(Conflict, match="job c"):
        store.create_job("d", spec("v"), t + 4, reuse_volume=False)
    assert store.begin_volume_delete("v", "tok") is not None
    assert store.finish_volume_delete("v", "tok", "test")
    store.create_job("d", spec("v"), t + 5, reuse_volume=False)  # a new volume: a's and c's ends are not on it


def test_retention_picks_volumes_unused_since_and_rechecks_when_it_claims(store: Store) -> None:
    now = time.time()
    _used(store, "old", "old", at=now - 10 * 86400)
    _used(store, "recent", "recent", at=now - 86400)
    store.create_job("busy", spec("busy"), now - 30 * 86400)  # queued for a month: still in use
    with Session(store.engine) as s:  # ended long ago (apply stamps updated_at with the clock)
        s.execute(update(JobRow).where(col(JobRow.volume_name) == "old").values(updated_at=now - 9 * 86400))
        s.execute(update(JobRow).where(col(JobRow.volume_name) == "recent").values(updated_at=now - 86400))
        s.commit()
    assert store.volumes_to_sweep(now - 7 * 86400, now - 300) == [("old", False)]
    assert store.volumes_to_sweep(None, now - 300) == []
    _used(store, "again", "old")  # a job uses it between the listing and the claim
    with pytest.raises(Conflict, match="was used since") as refused:
        store.begin_volume_delete("old", "gc", unused_since=now - 7 * 86400)
    assert refused.value.code == "volume_used"


def test_this_process_s_sqlite_writers_queue_on_the_store_s_lock_and_every_end_releases_it(tmp_path: Path) -> None:
    """The store queues its own SQLite writers on a lock instead of SQLite's sleeping busy
    handler (store/db.py; bench/sqlite_writers.py shows why). Whatever ends a write (commit, a
    refused write's rollback, an exception in the middle) lets the next writer in: writers in
    other threads all finish, none is refused for a lock the process leaked."""
    from sqlalchemy import text

    store = Store(f"sqlite:///{tmp_path / 'gpuhop.db'}")
    store.migrate()
    job_spec = JobSpec.model_validate({"name": "t", "command": ["true"], "volume": {"name": "v", "size_gb": 1}})
    try:
        store.create_job("j1", job_spec, time.time())
        with pytest.raises(Conflict):  # refused, rolled back: the volume is j1's
            store.create_job("j2", job_spec, time.time())
        with pytest.raises(RuntimeError), store._write() as s:
            s.execute(text("UPDATE jobs SET message = 'half-way'"))
            raise RuntimeError("a bug in the middle of a write")
        assert store.get_job("j1").message != "half-way"
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                for n in range(20):
                    store.update_job("j1", message=f"{k}-{n}")
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)  # a deadline for a leaked lock, not a claim about speed
        assert not any(t.is_alive() for t in threads) and not errors, errors
        assert store.get_job("j1").message.endswith("-19")
    finally:
        store.close()
