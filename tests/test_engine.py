"""The Engine driven tick by tick against an in-process fake provider (tests/fake_provider.py)
and a real Store on SQLite: what it writes (job and attempt rows) and what it does at the
provider (the fake's ledger of instances created and terminated, with their bills).

Only behaviour is asserted, never the engine's internals, so these hold whether launches run
inside the tick or in background workers: every step is `tick()` then `drain()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import NoCapacity, RetryLater
from orchestrator.engine import hint_gap, next_tick_in
from orchestrator.models import AttemptStatus, JobSpec
from orchestrator.store import AttemptRow, JobRow
from tests.fake_provider import FakeAdapter, Rig

JOB = "j1"


def spec(**extra: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "train", "command": ["python3", "train.py"],
        "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
        "policy": {"max_relaunches": 3, "checkpoint_interval": 60},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(data)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig.create(tmp_path, FakeAdapter.create(tmp_path, capacity={"r1": 4, "r2": 4}, prices={"r1": 0.5, "r2": 0.4}))
    try:
        yield r
    finally:
        await r.engine.drain()
        r.close()


def job(r: Rig, job_id: str = JOB) -> JobRow:
    row = r.store.get_job(job_id)
    assert row is not None
    return row  # type: ignore[no-any-return]


def attempts(r: Rig, job_id: str = JOB) -> list[AttemptRow]:
    return list(r.store.attempts(job_id))


def launched(r: Rig, job_id: str = JOB) -> list[AttemptRow]:
    """Attempts the provider accepted (a pending row is a launch in flight, not yet a fact)."""
    return [a for a in attempts(r, job_id) if a.status != AttemptStatus.PENDING.value]


def running(r: Rig, number: int = 1, job_id: str = JOB) -> AttemptRow | None:
    return next((a for a in attempts(r, job_id) if a.number == number and a.status == "running"), None)


async def test_a_lost_launch_answer_is_adopted_not_paid_twice(rig: Rig) -> None:
    """The provider made the instance but the answer never came back (a timeout after the
    fact): the write-ahead attempt finds its instance by name; nothing is launched twice."""
    rig.store.create_job(JOB, spec())
    rig.fake.fail_next("launch", 1, RetryLater, after=True)
    first = await rig.until(lambda: running(rig), "attempt 1 running")
    (made,) = rig.fake.created()
    assert first.instance_id == made.instance_id and first.name == made.name == f"gpuhop-{JOB}-1"
    assert first.region == made.region == "r2"  # recorded as what it is: the cheaper offer's machine
    assert [a.number for a in attempts(rig)] == [1]
    assert rig.fake.terminated() == {}
    assert job(rig).status == "running"


async def test_a_pending_attempt_left_by_a_crash_adopts_its_instance(rig: Rig) -> None:
    """A daemon crashed between recording attempt 1 (write-ahead) and recording the provider's
    answer. The next daemon's first ticks adopt the instance that exists under its name."""
    rig.store.create_job(JOB, spec())
    rig.store.update_job(JOB, status="launching")
    rig.store.add_attempt(AttemptRow(
        job_id=JOB, number=1, name=f"gpuhop-{JOB}-1", provider="fake", region="r1", offer_id="r1-RTX-4090",
        capacity="on-demand", gpu="RTX-4090", gpu_count=1, price_per_hour=0.5,
        status=AttemptStatus.PENDING.value, created_at=time.time(),
    ))
    instance_id = rig.fake.add_instance(f"gpuhop-{JOB}-1", "r1")
    first = await rig.until(lambda: running(rig), "attempt 1 running on the adopted instance")
    assert first.instance_id == instance_id
    assert [e.instance_id for e in rig.fake.created()] == [instance_id], "a second instance was launched"
    assert rig.fake.terminated() == {}, "the adopted instance was stopped as an orphan"
    assert [a.number for a in attempts(rig)] == [1]


async def test_no_capacity_moves_on_to_the_next_offer(rig: Rig) -> None:
    rig.store.create_job(JOB, spec())
    rig.fake.fail_next("launch", 1, NoCapacity)  # r2, the cheaper, says no
    await rig.until(lambda: launched(rig), "an attempt launched")
    (a,) = launched(rig)
    assert a.region == "r1" and a.status in ("launching", "running")
    assert [e.region for e in rig.fake.created()] == ["r1"]
    assert [x.number for x in attempts(rig)] == [a.number], "the refused try left an attempt behind"


async def test_a_preempted_attempt_is_relaunched_where_its_volume_is(rig: Rig) -> None:
    rig.store.create_job(JOB, spec(volume={"name": "ckpt", "size_gb": 10}))
    first = await rig.until(lambda: running(rig), "attempt 1 running")
    assert first.region == "r2"  # the cheaper region; the volume is made there
    rig.fake.prices["r2"] = 5.0  # r1 is now far cheaper, but the volume lives in r2
    rig.fake.preempt(first.instance_id or "")

    second = await rig.until(lambda: running(rig, 2), "attempt 2 running")
    ended = attempts(rig)[0]
    assert (ended.status, ended.end_reason) == ("ended", "preempted")
    assert job(rig).relaunches == 1 and job(rig).status == "running"
    assert second.region == "r2" and second.volume_id == ended.volume_id is not None
    req1, req2 = ([q for q in rig.fake.requests if q.attempt == n][-1] for n in (1, 2))
    assert req1.volume is not None and req2.volume == req1.volume
    assert req2.env["GPUHOP_ATTEMPT"] == "2" and req2.name == f"gpuhop-{JOB}-2"
    # the preempted machine is stopped (a stopped pod still bills its disk), and only it
    assert set(rig.fake.terminated()) == {first.instance_id}
    assert len(rig.fake.created()) == 2


async def test_budget_stops_the_attempt_and_the_job(tmp_path: Path) -> None:
    fake = FakeAdapter.create(tmp_path, capacity={"r1": 4}, prices={"r1": 36_000.0})  # $10 a second
    r = Rig.create(tmp_path, fake)
    try:
        r.store.create_job(JOB, spec(policy={"max_cost_usd": 1.0}))
        await r.until(lambda: job(r).status == "failed", "the job stopped by its budget")
        row = job(r)
        assert row.end_reason is not None and row.end_reason.startswith("budget:"), row.end_reason
        (a,) = attempts(r)
        assert (a.status, a.end_reason) == ("ended", "budget")
        assert a.cost_usd >= 1.0
        (made,) = fake.created()  # no relaunch past the budget
        bill = fake.terminated()[made.instance_id]
        assert bill is not None and bill.ended_at is not None and bill.cost_usd >= 1.0
        for _ in range(3):  # an ended job launches nothing more
            await r.step()
        assert len(fake.created()) == 1 and not fake.live()
    finally:
        await r.engine.drain()
        r.close()


async def test_a_succeeded_job_stops_its_machine(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """By the step that ends the job, not by the orphan reaper's next pass (which would also
    stop it, and has tests of its own): without the reaper the machine must still stop."""

    async def no_reaper(*_args: object) -> None:
        return None

    monkeypatch.setattr(rig.engine, "_reap", no_reaper)
    rig.store.create_job(JOB, spec())
    first = await rig.until(lambda: running(rig), "attempt 1 running")
    rig.fake.exit(first.instance_id or "", 0)
    await rig.until(lambda: job(rig).status == "succeeded", "job succeeded")
    await rig.until(lambda: first.instance_id in rig.fake.terminated(), "its machine terminated")
    (a,) = attempts(rig)
    assert (a.end_reason, a.exit_code) == ("succeeded", 0)
    assert not rig.fake.live()


class RemoteFake(FakeAdapter):
    """The fake as a cloud provider: the daemon cannot see its processes, so a silent agent
    means a lost machine (heartbeat timeout)."""

    remote = True


async def test_a_quiet_job_is_still_judged_when_the_clock_or_the_listing_says_so(tmp_path: Path) -> None:
    """The engine stops re-deciding a job while nothing it reads changes (reconcile.quiet_until).
    A heartbeat that stops is still caught once the timeout passes, and a preemption is still
    caught on the next tick, however long the job had been quiet."""
    fake = RemoteFake.create(tmp_path, capacity={"r1": 4}, prices={"r1": 0.5})
    r = Rig.create(tmp_path, fake, heartbeat_timeout_seconds=3.0)  # a loaded CI machine let 1.5 s of silence pass
    try:
        r.store.create_job(JOB, spec())
        r.store.create_job("j2", spec())
        first = await r.until(lambda: running(r), "attempt 1 running")

        def reporting() -> AttemptRow | None:  # j1's agent reports from the start, however long j2 takes
            r.store.update_attempt(first.id or 0, last_heartbeat_at=time.time())
            return running(r, job_id="j2")

        second = await r.until(reporting, "j2's attempt 1 running")
        # j1's agent reports; j2's does not. While j1's reports come, it stays running.
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            r.store.update_attempt(first.id or 0, last_heartbeat_at=time.time())
            await r.step()
        assert running(r) is not None, r.describe()
        lost = next(a for a in attempts(r, "j2") if a.number == 1)
        assert (lost.status, lost.end_reason) == ("ended", "lost"), r.describe()
        assert "no report from the agent" in lost.detail
        # j1 has been quiet for many ticks; its machine is taken: the next tick sees it
        for _ in range(3):
            await r.step()
        fake.preempt(first.instance_id or "")
        await r.step()
        ended = next(a for a in attempts(r) if a.number == 1)
        assert (ended.status, ended.end_reason) == ("ended", "preempted"), r.describe()
        assert second.id != first.id
    finally:
        await r.engine.drain()
        r.close()


async def test_a_job_waiting_for_capacity_is_decided_again_only_when_its_rows_or_its_time_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tick reads through the change feed (store/feed.py): a job queued for capacity whose
    rows do not change is not decided again until its backoff ends, so 10,000 of them cost an
    idle tick nothing. A cancel (its row changes) is acted on at the next tick, and capacity
    that appears is found when the backoff ends."""
    from orchestrator import reconcile

    fake = FakeAdapter.create(tmp_path, capacity={"r1": 0}, prices={"r1": 0.5})
    r = Rig.create(tmp_path, fake, retry_backoff_max_seconds=3.0)
    decided: list[str] = []
    real = reconcile.decide

    def counting(job_view: Any, *args: Any, **kwargs: Any) -> Any:
        decided.append(job_view.id)
        return real(job_view, *args, **kwargs)

    monkeypatch.setattr(reconcile, "decide", counting)
    try:
        for job_id in ("j1", "j2"):
            r.store.create_job(job_id, spec())
        await r.until(lambda: all(job(r, j).next_try_at for j in ("j1", "j2")), "both waiting for capacity")
        await r.step()  # the tick that reads the notes: both quiet from here on
        decided.clear()
        for _ in range(5):
            await r.step()
        waiting = [job(r, j) for j in ("j1", "j2")]
        if all((w.next_try_at or 0) > time.time() for w in waiting):  # (a slow machine may pass the backoff)
            assert decided == [], decided
        r.store.request_cancel("j1")
        decided.clear()
        await r.step()
        assert job(r, "j1").status == "cancelled" and "j1" in decided, r.describe()
        fake.capacity["r1"] = 4
        await r.until(lambda: running(r, job_id="j2"), "j2 launched once its backoff ended")
        assert r.store._feed.full_reads == 1  # every tick after the first read only what changed
    finally:
        await r.engine.drain()
        r.close()


async def test_jobs_that_nothing_fits_share_a_few_commits_and_wait_for_their_note(tmp_path: Path) -> None:
    """A thousand jobs that no offer fits: each launch finds nothing at once (the placement is
    remembered), and its "waiting for capacity" note goes into a shared batch while the worker
    moves on; the job counts as launching until its note is written. Before, each of the
    `launch_concurrency` workers waited for its own note: a commit per two jobs here (issue 9:
    the engine's first look at a new job cost 600 us of CPU, most of it these commits)."""
    fake = FakeAdapter.create(tmp_path, capacity={"r1": 0}, prices={"r1": 0.5})
    r = Rig.create(tmp_path, fake, launch_concurrency=2, retry_backoff_max_seconds=60.0)
    commits: list[int] = []  # notes per commit
    real = r.store.apply_many

    def counting(items: Any) -> Any:
        notes = sum(1 for _, _, _, events in items if any(kind == "no_capacity" for _, kind, _ in events))
        if notes:
            commits.append(notes)
        return real(items)

    r.store.apply_many = counting
    # the batch waits for drain or a full NOTE_BATCH, not a timer: on a loaded machine the 10 ms
    # gather window ends while launches are still queuing, and the count of commits would say
    # how busy the machine was rather than how notes are batched
    r.engine.workers.write_gather_seconds = 60.0
    try:
        ids = [f"j{n:03d}" for n in range(200)]
        for job_id in ids:
            r.store.create_job(job_id, spec())
        await r.engine.tick()  # decides all 200: each launch is queued
        assert all(r.engine.workers.launching(j) for j in ids)
        await r.engine.drain()  # the notes are written, then the launches are over
        assert not any(r.engine.workers.launching(j) for j in ids)
        assert sum(commits) == 200 and len(commits) <= 2, commits  # a full batch of 256 is never reached
        for job_id in ids:
            row = job(r, job_id)
            assert row.next_try_at and row.message.startswith("waiting for capacity"), row.message
            assert [e.kind for e in r.store.events(job_id)].count("no_capacity") == 1
        assert r.engine.workers.take_settled() == set(ids)  # each is decided again at the next tick
    finally:
        await r.engine.drain()
        r.close()


async def test_stopping_abandons_launches_not_begun_and_finishes_those_under_way(tmp_path: Path) -> None:
    """A daemon stopping with many jobs waiting for a launch slot: the launch under way is
    carried to its end (recorded, its machine owned), the ones not begun are not begun (20,000
    queued jobs took drain's whole 30 s grace before), and every job is still there to be
    placed by the next start."""
    fake = FakeAdapter.create(tmp_path, capacity={"r1": 50}, prices={"r1": 0.5})
    fake.delays["launch"] = 0.3
    r = Rig.create(tmp_path, fake, launch_concurrency=1)
    try:
        for n in range(20):
            r.store.create_job(f"j{n:02d}", spec())
        stop = asyncio.Event()
        running = asyncio.create_task(r.engine.run(stop))
        for _ in range(3000):  # the first launch call made (a deadline, not a claim about speed)
            if fake.created():
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(running, 30)
        made = len(fake.created())
        assert 1 <= made <= 2, f"{made} launches after the stop: the waiting ones went on"
        attempts = [a for n in range(20) for a in r.store.attempts(f"j{n:02d}")]
        assert sorted(a.name for a in attempts if a.instance_id) == sorted(e.name for e in fake.created())
        assert len(r.store.active_jobs()) == 20  # none lost: each is placed again on the next start
    finally:
        r.close()


def test_ticks_woken_early_come_in_small_slices_but_take_at_most_a_third_of_the_time() -> None:
    assert hint_gap(1.0, 0.005) == pytest.approx(0.05)  # a quick tick: the next may come soon
    assert hint_gap(1.0, 0.1) == pytest.approx(0.2)  # a 0.1 s tick: 0.2 s before the next
    assert hint_gap(1.0, 2.0) == pytest.approx(1.0)  # never longer than the period itself
    assert hint_gap(0.02, 0.001) == pytest.approx(0.02)


def test_ticks_start_a_period_apart_with_a_pause_after_a_slow_one() -> None:
    assert next_tick_in(1.0, 0.3) == pytest.approx(0.7)  # not 1.0 after a 0.3 s tick
    assert next_tick_in(1.0, 0.0) == pytest.approx(1.0)
    assert next_tick_in(1.0, 2.5) == pytest.approx(0.1)  # slower than its period: still a pause
    assert next_tick_in(5.0, 4.9) == pytest.approx(0.5)
