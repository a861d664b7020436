"""Jobs that move away from their volume (issue 11.2), driven through the real Engine and Store
against the in-process fake provider (tests/fake_provider.py): an object-store job whose data
center ran out moves and says why and what the transfer cost; a sync = "none" job waits pinned;
a short expected wait keeps the job waiting; and whatever a crash interrupts, every provider
volume stays owned (the row's, the row's move, or retired and then deleted)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import NoCapacity, RetryLater
from orchestrator import engine as engine_module
from orchestrator.models import JobSpec
from orchestrator.moving import MovingSettings
from orchestrator.store import AttemptRow
from tests.fake_provider import FakeAdapter, Rig

JOB = "j1"
GPU = "RTX-4090"
# waiting an idle hour costs $10; a GB out of the bucket $0.01: with the 30-minute prior a move wins
EAGER = MovingSettings(egress_usd_per_gb=0.01, wait_usd_per_hour=10.0)


def spec(sync: str) -> JobSpec:
    return JobSpec.model_validate({
        "name": "train", "command": ["python3", "train.py"],
        "resources": {"gpu": [GPU], "gpu_count": 1},
        "policy": {"max_relaunches": 5, "checkpoint_interval": 60},
        "volume": {"name": "ckpt", "size_gb": 10, "sync": sync},
    })


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setattr(engine_module, "MOVE_SWEEP_SECONDS", 0.0)  # every tick sweeps: no waiting in tests
    fake = FakeAdapter.create(tmp_path, capacity={"r1": 1, "r2": 4}, prices={"r1": 0.5, "r2": 0.6})
    r = Rig.create(tmp_path, fake)
    r.engine.workers.relocation.settings = EAGER
    try:
        yield r
    finally:
        await r.engine.drain()
        r.close()


def attempts(r: Rig) -> list[AttemptRow]:
    return list(r.store.attempts(JOB))


def running(r: Rig, number: int) -> AttemptRow | None:
    return next((a for a in attempts(r) if a.number == number and a.status == "running"), None)


async def r1_runs_out(r: Rig, sync: str) -> AttemptRow:
    """The job runs in r1 (the cheaper), then r1's capacity goes and its machine with it."""
    r.store.create_job(JOB, spec(sync))
    first = await r.until(lambda: running(r, 1), "attempt 1 running")
    assert first.region == "r1"
    r.fake.capacity["r1"] = 0
    r.fake.preempt(first.instance_id or "")
    return first  # type: ignore[no-any-return]


def owned_volumes(r: Rig) -> set[str]:
    """Every provider volume the books know of: the row's, its move's, the retired ones."""
    vol = r.store.volume("ckpt")
    known = {vol.provider_volume_id, vol.move_volume_id} if vol else set()
    return {v for v in known if v} | {x.provider_volume_id for x in r.store.retired_volumes()}


async def test_an_object_store_job_moves_when_its_place_has_no_capacity(rig: Rig) -> None:
    first = await r1_runs_out(rig, "object-store")
    second = await rig.until(lambda: running(rig, 2), "attempt 2 running elsewhere")
    assert second.region == "r2" and second.volume_id != first.volume_id
    assert second.placement_reason.startswith("moved from fake/r1, which has no capacity: move to fake/r2")
    assert "expected wait at fake/r1 30.0 min" in second.placement_reason
    # 10 GB x $0.01 egress, plus 10 GB at 100 MB/s (102.4 s) of the $0.60/h machine
    assert second.transfer_cost_usd == pytest.approx(0.1 + 102.4 / 3600 * 0.6, abs=1e-6)
    assert attempts(rig)[0].transfer_cost_usd is None  # the first placement was no move
    vol = rig.store.volume("ckpt")
    assert (vol.provider, vol.region, vol.provider_volume_id, vol.move_attempt) == ("fake", "r2", second.volume_id, None)
    await rig.until(lambda: set(rig.fake.volumes) == {second.volume_id}, "the old volume deleted at the provider")
    assert rig.store.retired_volumes() == []
    assert "volume_moved" in [e.kind for e in rig.store.events(JOB)]
    gaps = rig.store.capacity_gap_stats(0, time.time())
    assert ("fake", "r1", GPU) in gaps  # the gap that made it move is on record


async def test_the_api_and_show_give_the_move_and_its_transfer_cost(rig: Rig) -> None:
    from rich.console import Console

    from orchestrator.api.views import attempt_out
    from orchestrator.render import job_detail

    await r1_runs_out(rig, "object-store")
    second = await rig.until(lambda: running(rig, 2), "attempt 2 running elsewhere")
    out = attempt_out(second, time.time()).model_dump(mode="json")
    assert out["transfer_cost_usd"] == pytest.approx(second.transfer_cost_usd)
    assert out["placement_reason"] == second.placement_reason
    job: dict[str, Any] = {"id": JOB, "name": "train", "status": "running", "message": "", "cost_usd": 0.0,
                           "created_at": "2026-01-01T00:00:00Z",
                           "attempts": [attempt_out(a, time.time()).model_dump(mode="json") for a in attempts(rig)]}
    console = Console(width=300, record=True)
    console.print(job_detail(job))
    text = console.export_text()
    assert "placement" in text and "moved from fake/r1, which has no capacity" in text and "$0.1171" in text


async def test_a_sync_none_job_waits_where_its_volume_is(rig: Rig) -> None:
    first = await r1_runs_out(rig, "none")
    for _ in range(10):
        await rig.step()
    assert [a.number for a in attempts(rig)] == [1]
    job = rig.store.get_job(JOB)
    assert job.status == "recovering" and job.message.startswith("waiting for capacity")
    vol = rig.store.volume("ckpt")
    assert (vol.region, vol.provider_volume_id, vol.move_attempt) == ("r1", first.volume_id, None)
    assert set(rig.fake.volumes) == {first.volume_id}
    rig.fake.capacity["r1"] = 1  # capacity comes back: it resumes where its volume is
    second = await rig.until(lambda: running(rig, 2), "attempt 2 running in r1")
    assert second.region == "r1" and second.volume_id == first.volume_id and second.transfer_cost_usd is None
    ended, seconds = rig.store.capacity_gap_stats(0, time.time())[("fake", "r1", GPU)]
    assert ended == 1 and seconds > 0  # the gap is on record, ended when r1 was offered again


async def test_a_short_expected_wait_keeps_the_job_waiting(rig: Rig) -> None:
    now = time.time()
    key = [("fake", "r1", GPU)]
    for n in range(100):  # r1 ran out a hundred times lately, and came back within 5 s each time
        rig.store.open_capacity_gaps(key, now - 10_000 + n * 60)
        rig.store.close_capacity_gaps(key, now - 10_000 + n * 60 + 5)
    first = await r1_runs_out(rig, "object-store")
    for _ in range(10):
        await rig.step()
    assert [a.number for a in attempts(rig)] == [1]
    job = rig.store.get_job(JOB)
    assert "waiting at fake/r1: expected wait at fake/r1" in job.message, job.message
    assert "100 gap(s) seen there" in job.message
    assert set(rig.fake.volumes) == {first.volume_id} and rig.store.volume("ckpt").move_attempt is None
    rig.fake.capacity["r1"] = 1
    second = await rig.until(lambda: running(rig, 2), "attempt 2 running in r1")
    assert second.region == "r1" and second.volume_id == first.volume_id


async def test_a_move_whose_launch_finds_no_capacity_retires_its_new_volume(rig: Rig) -> None:
    first = await r1_runs_out(rig, "object-store")
    rig.fake.fail_next("launch", 1, NoCapacity)  # r2 says no once the volume is made there
    second = await rig.until(lambda: running(rig, 2), "attempt 2 running after one refused move")
    assert second.region == "r2"
    await rig.until(lambda: set(rig.fake.volumes) == {second.volume_id}, "only the moved volume left")
    assert rig.store.retired_volumes() == [] and first.volume_id not in rig.fake.volumes


async def test_a_crash_after_making_the_new_volume_leaves_nothing_unowned(rig: Rig) -> None:
    """The daemon recorded the move and made the volume in r2, then died before writing its id
    or any attempt. Meanwhile r1 has capacity again: the next launch settles the move (the
    volume is found by name in r2 and retired) and the job stays where its volume is."""
    first = await r1_runs_out(rig, "object-store")
    rig.engine.workers.relocation.settings = MovingSettings(enabled=False)  # hold the job still
    for _ in range(3):
        await rig.step()
    assert rig.store.begin_volume_move("ckpt", first.volume_id, "fake", "r2", f"gpuhop-{JOB}-2") is None
    made = await rig.fake.ensure_volume("ckpt", 10, "r2")  # ...and the crash: its id never written
    assert made.volume_id in rig.fake.volumes and made.volume_id not in owned_volumes(rig) - {None}
    assert rig.store.volume("ckpt").move_region == "r2"  # but the move is on the books, by place
    rig.engine.workers.relocation.settings = EAGER
    rig.fake.capacity["r1"] = 1
    second = await rig.until(lambda: running(rig, 2), "attempt 2 running after the crash")
    assert second.region == "r1" and second.volume_id == first.volume_id
    await rig.until(lambda: set(rig.fake.volumes) == {first.volume_id}, "the crash's volume in r2 deleted")
    vol = rig.store.volume("ckpt")
    assert (vol.region, vol.provider_volume_id, vol.move_attempt) == ("r1", first.volume_id, None)


async def test_a_moved_launch_whose_answer_was_lost_is_adopted_and_the_move_committed(rig: Rig) -> None:
    """The provider made the machine in r2 but the answer never came back: the attempt stays
    pending with the move recorded; the tick adopts the machine and the sweep commits the move."""
    first = await r1_runs_out(rig, "object-store")
    rig.fake.fail_next("launch", 1, RetryLater, after=True)
    second = await rig.until(lambda: running(rig, 2), "attempt 2 adopted and running")
    assert second.region == "r2" and len([e for e in rig.fake.created() if e.region == "r2"]) == 1

    def settled() -> bool:
        vol = rig.store.volume("ckpt")
        return vol.move_attempt is None and set(rig.fake.volumes) == {second.volume_id}

    await rig.until(settled, "the move committed and the old volume deleted")
    vol = rig.store.volume("ckpt")
    assert (vol.region, vol.provider_volume_id) == ("r2", second.volume_id)
    assert first.volume_id not in rig.fake.volumes


async def test_a_retired_volume_whose_delete_fails_is_kept_and_retried(rig: Rig) -> None:
    first = await r1_runs_out(rig, "object-store")
    rig.fake.fail_next("delete_volume", 2)
    second = await rig.until(lambda: running(rig, 2), "attempt 2 running elsewhere")
    assert first.volume_id in owned_volumes(rig)  # still on the books while its provider refuses
    await rig.until(lambda: set(rig.fake.volumes) == {second.volume_id}, "deleted once the provider agrees")
    assert rig.store.retired_volumes() == []


async def crashed_before_the_moved_launch(rig: Rig) -> tuple[AttemptRow, str]:
    """The daemon recorded the move, made the volume, wrote the pending attempt, and died before
    asking the provider. Returns attempt 1 and the move's volume id."""
    first = await r1_runs_out(rig, "object-store")
    rig.engine.workers.relocation.settings = MovingSettings(enabled=False)  # hold the job still
    for _ in range(3):
        await rig.step()
    name = f"gpuhop-{JOB}-2"
    assert rig.store.begin_volume_move("ckpt", first.volume_id, "fake", "r2", name) is None
    made = await rig.fake.ensure_volume("ckpt", 10, "r2")
    assert rig.store.set_move_volume("ckpt", name, made.volume_id)
    rig.store.add_attempt(AttemptRow(
        job_id=JOB, number=2, name=name, provider="fake", region="r2", offer_id=f"r2-{GPU}", capacity="on-demand",
        gpu=GPU, gpu_count=1, price_per_hour=0.6, volume_id=made.volume_id, status="pending",
        placement_reason="moved from fake/r1", transfer_cost_usd=0.12, created_at=time.time(),
    ))
    return first, made.volume_id


async def test_a_crash_before_the_moved_launch_is_reissued_and_the_move_committed(rig: Rig) -> None:
    """The next daemon re-issues the launch under the attempt's name, with the move's volume,
    and the launch commits the move."""
    _, made_id = await crashed_before_the_moved_launch(rig)
    name = f"gpuhop-{JOB}-2"
    made = rig.fake.volumes[made_id]
    second = await rig.until(lambda: running(rig, 2), "the pending moved attempt re-issued and running")
    assert second.volume_id == made.volume_id and [q.volume for q in rig.fake.requests if q.name == name][-1] == made
    await rig.until(lambda: set(rig.fake.volumes) == {made.volume_id}, "the old volume deleted")
    vol = rig.store.volume("ckpt")
    assert (vol.region, vol.provider_volume_id, vol.move_attempt) == ("r2", made.volume_id, None)


async def test_a_job_cancelled_during_its_move_leaves_one_volume(rig: Rig) -> None:
    """Cancelled before the moved attempt ever launched: the attempt ends unlaunched, the move is
    aborted by the sweep, and the volume made for it is deleted; the job's volume stays in r1."""
    first, made_id = await crashed_before_the_moved_launch(rig)
    rig.store.request_cancel(JOB)
    rig.fake.fail_next("launch", 50, RetryLater)  # the re-issued launch never gets through
    await rig.until(lambda: rig.store.get_job(JOB).status == "cancelled", "the job cancelled")
    await rig.until(lambda: set(rig.fake.volumes) == {first.volume_id}, "the move's volume deleted")
    vol = rig.store.volume("ckpt")
    assert (vol.region, vol.provider_volume_id, vol.move_attempt) == ("r1", first.volume_id, None)
    assert made_id not in rig.fake.volumes and rig.fake.live() == []


class OtherCloud(FakeAdapter):
    name = "other"


async def test_a_job_moves_across_providers_but_not_while_its_own_is_down(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Its provider suspended (or starting, or failing) says nothing about capacity: the job
    waits. Once that provider lists offers again and still has nothing in r1, the job moves to
    the other provider, whose volume is made there, and the old one is deleted through its own."""
    from orchestrator.engine import Engine

    monkeypatch.setattr(engine_module, "MOVE_SWEEP_SECONDS", 0.0)
    fake = FakeAdapter.create(tmp_path, capacity={"r1": 1}, prices={"r1": 0.5})
    other = OtherCloud.create(tmp_path / "other", capacity={"x1": 4}, prices={"x1": 0.7})
    rig = Rig.create(tmp_path, fake)
    rig.engine = Engine(rig.engine.settings, rig.store, {"fake": fake, "other": other}, lambda n: f"t-{n}")
    rig.engine.workers.relocation.settings = EAGER
    try:
        first = await r1_runs_out(rig, "object-store")
        rig.engine.observer.suspend("fake", "insufficient balance (test)", 3600)
        for _ in range(5):
            await rig.step()
        assert [a.number for a in attempts(rig)] == [1] and other.volumes == {}
        rig.engine.observer.health["fake"].suspended_until = time.time() - 1  # the suspension is over
        second = await rig.until(lambda: running(rig, 2), "attempt 2 running on the other provider")
        assert (second.provider, second.region) == ("other", "x1")
        assert second.placement_reason.startswith("moved from fake/r1, which has no capacity: move to other/x1")
        await rig.until(lambda: fake.volumes == {}, "the old volume deleted at its own provider")
        vol = rig.store.volume("ckpt")
        assert (vol.provider, vol.region, vol.provider_volume_id) == ("other", "x1", second.volume_id)
        # both fakes number their volumes alike: ids are compared with their provider, never alone
        assert set(other.volumes) == {second.volume_id} == {first.volume_id}
    finally:
        await rig.engine.drain()
        rig.close()
