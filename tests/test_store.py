"""The store on SQLite and PostgreSQL: migrations, the job and attempt verbs, volume conflicts."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from orchestrator.models import AttemptStatus, EndReason, JobSpec
from orchestrator.store import AttemptRow, Conflict, Store, VolumeRow


def spec(**extra: object) -> JobSpec:
    return JobSpec.model_validate({"name": "t", "command": ["true"], **extra})


@pytest.fixture
def store(db_url: str) -> Store:
    s = Store(db_url)
    s.migrate()
    yield s
    s.close()


def test_migrations_match_models_and_are_idempotent(store: Store) -> None:
    store.migrate()  # a second start changes nothing
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def test_job_lifecycle_and_attempts(store: Store) -> None:
    job = store.create_job("abc123", spec())
    assert store.get_job("abc123").status == "queued"
    assert [j.id for j in store.active_jobs()] == ["abc123"]
    assert store.next_attempt_number(job.id) == 1
    row = store.add_attempt(AttemptRow(job_id=job.id, number=1, name="gpuhop-abc123-1", provider="local",
                                       status=AttemptStatus.PENDING.value, created_at=time.time()))
    assert store.next_attempt_number(job.id) == 2
    assert [a.name for a in store.live_attempts()] == ["gpuhop-abc123-1"]
    store.apply(job.id, {"status": "running"}, {row.id: {"status": "running", "instance_id": "i-1"}},
                [(1, "running", "attempt 1 running")])
    assert store.attempt_by_instance("local", "i-1").number == 1
    assert store.get_job(job.id).status == "running"
    assert store.events(job.id)[-1].message == "attempt 1 running"
    store.update_attempt(row.id, status="ended", end_reason=EndReason.PREEMPTED.value, launched_at=time.time() - 3600,
                         ended_at=time.time())
    assert store.live_attempts() == []
    hist = store.preemption_history()
    assert hist[0][0] == "local" and hist[0][2] == 1


def test_pending_attempt_can_be_dropped_but_not_a_launched_one(store: Store) -> None:
    store.create_job("j1", spec())
    store.create_job("j2", spec())
    pending = store.add_attempt(AttemptRow(job_id="j1", number=1, name="p-j1-1", provider="local",
                                           status="pending", created_at=time.time()))
    launched = store.add_attempt(AttemptRow(job_id="j2", number=1, name="p-j2-1", provider="local",
                                            status="launching", created_at=time.time()))
    store.delete_attempt(pending.id)
    store.delete_attempt(launched.id)
    assert store.attempts("j1") == [] and [a.number for a in store.attempts("j2")] == [1]


def test_attempt_names_are_unique(store: Store) -> None:
    store.create_job("j1", spec())
    store.add_attempt(AttemptRow(job_id="j1", number=1, name="n-1", provider="local", status="ended",
                                 created_at=time.time()))
    with pytest.raises(Conflict, match="attempt 'n-1' already exists"):
        store.add_attempt(AttemptRow(job_id="j1", number=1, name="n-1", provider="local", status="pending",
                                     created_at=time.time()))


def test_a_volume_serves_one_active_job_at_a_time(store: Store) -> None:
    vol = {"volume": {"name": "ckpt", "size_gb": 10}}
    store.create_job("j1", spec(**vol))
    with pytest.raises(Conflict, match="in use by job j1"):
        store.create_job("j2", spec(**vol))
    assert store.get_job("j2") is None
    store.update_job("j1", status="succeeded")
    store.create_job("j3", spec(**vol))
    assert store.volume("ckpt").size_gb == 10


def test_cancel_is_desired_state_and_idempotent(store: Store) -> None:
    store.create_job("j1", spec())
    assert store.request_cancel("j1").cancel_requested
    assert store.request_cancel("j1").cancel_requested
    store.update_job("j1", status="succeeded")
    store.create_job("j2", spec())
    store.update_job("j2", status="failed")
    assert not store.request_cancel("j2").cancel_requested
    assert store.request_cancel("nope") is None
    assert store.counts_by_status() == {"succeeded": 1, "failed": 1}


def test_active_changes_reads_exactly_the_rows_that_changed(store: Store) -> None:
    """The tick's read through the change feed (store/feed.py): after the first, full read,
    unchanged rows are neither loaded nor reported; any INSERT, UPDATE or DELETE, through the
    store's verbs or plain SQL that bypasses them, is seen at the next read (the database's
    triggers stamp it); ended jobs and deleted attempts drop out."""
    from sqlalchemy import text

    now = time.time()
    for j in ("j1", "j2", "j3"):
        store.create_job(j, spec(), now)
        store.add_attempt(AttemptRow(job_id=j, number=1, name=f"{j}-1", provider="local",
                                     status="pending" if j == "j2" else "running", created_at=now))

    def plain(jobs: Iterable[Any], attempts: dict[str, list[Any]]) -> tuple[dict, dict]:
        return ({j.id: j.model_dump() for j in jobs},
                {k: [a.model_dump() for a in v] for k, v in attempts.items()})

    def uncached() -> tuple[dict, dict]:
        jobs = store.active_jobs()
        return plain(jobs, store.attempts_for([j.id for j in jobs]))

    def read() -> tuple[set[str] | None, set[str], int]:
        before = store._feed.rows_loaded
        state = store.active_changes()
        assert plain(state.jobs.values(), state.attempts) == uncached()
        return state.changed, state.removed, store._feed.rows_loaded - before

    assert read() == (None, set(), 6)  # the first read is a full one
    assert read() == (set(), set(), 0)  # nothing changed: nothing loaded, nothing reported
    store.update_job("j1", message="hello")
    a2 = store.attempts("j2")[0]
    store.update_attempt(a2.id or 0, last_heartbeat_at=now + 5)
    with store._write() as s:  # a writer that knows nothing of versions or the feed
        s.execute(text("UPDATE attempts SET detail = 'raw' WHERE name = 'j3-1'"))
        s.commit()
    changed, removed, loaded = read()
    assert changed == {"j1", "j2", "j3"} and removed == set() and loaded == 3
    jobs, attempts = store.active_state()
    assert {j.id: j.message for j in jobs}["j1"] == "hello"
    assert attempts["j2"][0].last_heartbeat_at == now + 5 and attempts["j3"][0].detail == "raw"

    store.update_job("j3", status="succeeded")
    store.delete_attempt(a2.id or 0)  # a launch every provider refused
    store.update_attempt(store.attempts("j1")[0].id or 0, status="ended", end_reason="preempted", ended_at=now)
    store.add_attempt(AttemptRow(job_id="j1", number=2, name="j1-2", provider="local", status="pending",
                                 created_at=now))
    store.create_job("j4", spec(), now)
    changed, removed, _ = read()
    assert changed == {"j1", "j2", "j4"} and removed == {"j3"}
    jobs, attempts = store.active_state()
    assert sorted(j.id for j in jobs) == ["j1", "j2", "j4"] and attempts["j2"] == [] and attempts["j4"] == []
    assert [a.number for a in attempts["j1"]] == [1, 2]
    with store._write() as s:  # an attempt inserted behind the store's back is seen too
        s.execute(text("INSERT INTO attempts (job_id, number, name, provider, region, offer_id, capacity, "
                       "gpu_count, price_per_hour, status, detail, agent_state, sigterm_received, "
                       "placement_reason, created_at, cost_usd, cost_final, duplicate_cost_usd) VALUES "
                       "('j4', 1, 'j4-1', 'local', '', '', '', 0, 0, 'pending', '', '', false, '', 0, 0, "
                       "false, 0)"))
        s.commit()
    assert read()[0] == {"j4"}
    assert read()[:2] == (set(), set())


def test_the_change_feed_misses_no_write_committed_during_a_read(store: Store) -> None:
    """Writers racing the reader: every write committed while reads run is in a later read (the
    horizon is taken before the rows are read). Checked against a full read after each round."""
    import threading

    now = time.time()
    for i in range(40):
        store.create_job(f"r{i:02d}", spec(), now)
    store.active_changes()
    stop = threading.Event()

    failures: list[BaseException] = []

    def writer(k: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                store.update_job(f"r{(n + k) % 40:02d}", message=f"m{k}-{n}")
                if n % 7 == 0:
                    store.create_job(f"w{k}-{n:05d}", spec(), now)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        seen: dict[str, str] = {}
        for _ in range(30):
            state = store.active_changes()
            seen = {j.id: j.message for j in state.jobs.values()}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    state = store.active_changes()  # after the last commit: must now agree with the table
    seen = {j.id: j.message for j in state.jobs.values()}
    assert seen == {j.id: j.message for j in store.active_jobs()}
    assert store._feed.full_reads == 1


def test_a_volume_created_after_its_row_was_removed_is_recorded_again(store: Store) -> None:
    """`gpuhop volume rm` of a cancelled job's volume can run while that job's launch is still
    creating it at the provider: when the launch reports where it lives, the row comes back, so
    the volume is listed, priced and deletable instead of billing unseen."""
    from orchestrator.models import VolumeSpec

    vol = VolumeSpec(name="ckpt", size_gb=30, mount_path="/data")
    store.create_job("j1", spec(volume=vol.model_dump()))
    assert store.set_volume_location("ckpt", "runpod", "EU-RO-1", "vol-1", vol) is True
    with store._write() as s:  # as a finished deletion leaves it
        s.delete(s.get(VolumeRow, store.volume("ckpt").id))
        s.commit()
    assert store.volume("ckpt") is None
    assert store.set_volume_location("ckpt", "runpod", "EU-RO-1", "vol-2", vol) is False
    again = store.volume("ckpt")
    assert again is not None and (again.provider_volume_id, again.size_gb, again.mount_path) == ("vol-2", 30, "/data")
    assert store.set_volume_location("other", "runpod", "EU-RO-1", "vol-3") is False  # no spec: nothing made
    assert store.volume("other") is None


def test_pages_filtered_by_several_statuses_are_the_full_list_filtered(store: Store) -> None:
    """A list by several statuses is read one status at a time and merged (the index order
    serves one status only): the pages must still be exactly the newest-first list filtered,
    each job once, ties on the creation time broken by id."""
    statuses = ["queued", "running", "failed", "succeeded"]
    for i in range(40):
        store.create_job(f"{i:08x}", JobSpec.model_validate({"name": f"j{i}", "command": ["true"]}),
                         now=1_000.0 + (i // 3))  # threes share a creation time
        status = statuses[i * 7 % 4]
        if status != "queued":
            store.update_job(f"{i:08x}", status=status)
    every = store.list_jobs(limit=1000)
    assert [(j.created_at, j.id) for j in every] == sorted(((j.created_at, j.id) for j in every), reverse=True)
    for wanted in (["running", "failed"], ["queued", "succeeded", "running"], ["failed", "failed"]):
        expected = [j.id for j in every if j.status in wanted]
        seen: list[str] = []
        before = None
        while True:
            page = store.list_jobs(wanted, limit=4, before=before)
            seen += [j.id for j in page]
            if len(page) < 4:
                break
            before = (page[-1].created_at, page[-1].id)
        assert seen == expected, wanted


def _pending(job_id: str, number: int = 1) -> AttemptRow:
    return AttemptRow(job_id=job_id, number=number, name=f"gpuhop-{job_id}-{number}", provider="fake",
                      status=AttemptStatus.PENDING.value, created_at=1.0)


def test_write_ahead_records_written_together_are_each_refused_alone(store: Store) -> None:
    """add_attempts (the launch workers' group commit): one transaction, but a job that already
    runs an attempt, an attempt name that exists, and a second attempt for one job within the
    same batch are refused each on its own, and the others are recorded with their ids."""
    for n in range(1, 6):
        store.create_job(f"j{n}", spec())
    store.add_attempt(_pending("j1"))  # j1 already has a live attempt
    store.add_attempt(_pending("j2"))
    store.update_attempt(store.attempts("j2")[0].id or 0, status=AttemptStatus.ENDED.value,
                         end_reason=EndReason.PREEMPTED.value)  # ended: its name is still taken
    answers = store.add_attempts([_pending("j1", 2), _pending("j2", 1), _pending("j3"), _pending("j4"),
                                  _pending("j4", 2), _pending("j5")])
    kinds = [type(a).__name__ for a in answers]
    assert kinds == ["Conflict", "Conflict", "AttemptRow", "AttemptRow", "Conflict", "AttemptRow"], answers
    assert "already runs attempt 1" in str(answers[0]) and "already exists" in str(answers[1])
    assert "already runs attempt 1" in str(answers[4])  # the batch's own j4-1 counts
    for n in (3, 4, 5):
        (row,) = store.attempts(f"j{n}")
        assert row.status == AttemptStatus.PENDING.value and row.number == 1
    assert [a.id for a in answers if isinstance(a, AttemptRow)] == [
        store.attempts(f"j{n}")[0].id for n in (3, 4, 5)]
    assert len(store.attempts("j1")) == 1 and len(store.attempts("j2")) == 1


def test_launches_recorded_together_are_answered_each_on_its_own(store: Store) -> None:
    from orchestrator.store import LaunchRecord

    for n in (1, 2):
        store.create_job(f"j{n}", spec())
    one, two = (store.add_attempt(_pending(f"j{n}")) for n in (1, 2))
    store.update_attempt(two.id or 0, status=AttemptStatus.ENDED.value, end_reason=EndReason.CANCELLED.value)
    answers = store.record_launches([
        LaunchRecord(one.id or 0, "i-1", 10.0, {"message": "launched"}, [(1, "launched", "on fake")]),
        LaunchRecord(two.id or 0, "i-2", 11.0, {"message": "must not"}),
        LaunchRecord(999_999, "i-3", 12.0),  # no such attempt
    ])
    assert answers == [True, False, False]
    assert [(a.status, a.instance_id) for a in store.attempts("j1")] == [("launching", "i-1")]
    assert [(a.status, a.instance_id) for a in store.attempts("j2")] == [("ended", None)]
    assert store.get_job("j1").message == "launched"  # type: ignore[union-attr]
    assert store.get_job("j2").message == "queued"  # type: ignore[union-attr]


def test_a_confirmed_launch_never_moves_an_attempt_backwards(store: Store) -> None:
    """record_launch: a pending attempt becomes launching with its machine; one the tick adopted
    meanwhile keeps its status and instance; one ended meanwhile (a cancel) stays ended, gets no
    machine, and the caller hears False (it then stops the machine)."""
    for n in (1, 2, 3):
        store.create_job(f"j{n}", JobSpec.model_validate({"name": f"j{n}", "command": ["true"]}))
    pending, adopted, ended = (store.add_attempt(AttemptRow(job_id=f"j{n}", number=1, name=f"gpuhop-j{n}-1",
                                                            provider="fake", status=AttemptStatus.PENDING.value,
                                                            created_at=1.0)) for n in (1, 2, 3))
    store.update_attempt(adopted.id or 0, status=AttemptStatus.RUNNING.value, instance_id="i-adopted", launched_at=5.0)
    store.update_attempt(ended.id or 0, status=AttemptStatus.ENDED.value, end_reason=EndReason.CANCELLED.value)
    assert store.record_launch(pending.id or 0, "i-1", 10.0, {"message": "launched"}, [(1, "launched", "on fake")])
    assert store.record_launch(adopted.id or 0, "i-2", 11.0)
    assert not store.record_launch(ended.id or 0, "i-3", 12.0, {"message": "must not"}, [(1, "launched", "no")])
    got = {a.job_id: (a.status, a.instance_id, a.launched_at) for n in (1, 2, 3) for a in store.attempts(f"j{n}")}
    assert got == {"j1": ("launching", "i-1", 10.0), "j2": ("running", "i-adopted", 5.0), "j3": ("ended", None, None)}
    assert store.get_job("j1").message == "launched"  # type: ignore[union-attr]
    assert store.get_job("j3").message == "queued"  # type: ignore[union-attr]
    assert [e.kind for e in store.events("j3")] == ["submitted"]
