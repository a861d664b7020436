"""The engine on the money path under faults (issue 7): a real Engine on a real SQLite store,
driven tick by tick against the in-process fake provider (tests/fake_provider.py), made to
misbehave the ways real providers did in the fault storms.

Each test names the defect it guards and fails on the engine that had it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from adapters.base import NoCapacity, RetryLater
from orchestrator.models import (
    AttemptStatus,
    InstanceState,
    JobSpec,
    JobStatus,
    LaunchRequest,
)
from orchestrator.models import Instance as ObservedInstance
from orchestrator.store import AttemptRow
from tests.fake_provider import FakeAdapter, Rig


def _spec(name: str = "train", volume: str | None = None, **policy: object) -> JobSpec:
    raw: dict[str, object] = {
        "name": name, "image": "python:3.11", "command": ["python", "train.py"],
        "resources": {"gpu": ["RTX-4090"], "gpu_count": 1},
    }
    if volume is not None:
        raw["volume"] = {"name": volume, "size_gb": 10}
    if policy:
        raw["policy"] = policy
    return JobSpec.model_validate(raw)


def _submit(rig: Rig, job_id: str, spec: JobSpec) -> None:
    rig.store.create_job(job_id, spec)


def _attempts(rig: Rig, job_id: str) -> list[AttemptRow]:
    return rig.store.attempts(job_id)


class StubbornCreate(FakeAdapter):
    """A provider that does not deduplicate names and carries out a create that its caller
    gave up on, as RunPod does with a create whose answer came too late (the adapter's name
    look-up ran before the slow create)."""

    async def launch(self, req: LaunchRequest) -> ObservedInstance:
        self.calls["launch"] += 1
        self.requests.append(req)

        async def create() -> ObservedInstance:
            await asyncio.sleep(self.delays.get("launch", 0.0))
            inst = self._create(req.name, req.offer.region, req.offer.offer_id,
                                req.volume.volume_id if req.volume else None, self.start_state)
            return self._view(inst)

        return await asyncio.shield(asyncio.ensure_future(create()))


class RemoteFake(FakeAdapter):
    """A provider whose machines the daemon cannot see: the agent reports (heartbeats)."""

    remote = True


# ----------------------------------------------------------------------------- 1. duplicates


async def test_slow_create_makes_one_machine_per_attempt(tmp_path: Path) -> None:
    """Issue 7.1: a create slower than provider_timeout_seconds used to be abandoned and issued
    again, and both machines ran the job. A launch is now awaited to its end."""
    fake = StubbornCreate.create(tmp_path, delays={"launch": 0.6})
    rig = Rig.create(tmp_path, fake, provider_timeout_seconds=0.1, listing_wait_seconds=0.05)
    try:
        _submit(rig, "j1", _spec())
        for _ in range(15):
            await rig.engine.tick()
            await asyncio.sleep(0.05)
        await rig.engine.drain()
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running")
        names = [e.name for e in fake.created()]
        assert names == ["gpuhop-j1-1"], names
    finally:
        rig.close()


async def test_duplicate_machine_is_stopped_recorded_and_costed(tmp_path: Path) -> None:
    """Issue 7.1: observation kept one instance per name, so a second machine carrying a live
    attempt's name was never seen. It is now stopped at once, with an event, and its bill is
    added to the attempt's cost."""
    fake = FakeAdapter.create(tmp_path, prices={"r1": 3600.0})  # $1 a second: costs are visible
    rig = Rig.create(tmp_path, fake)
    try:
        _submit(rig, "j1", _spec())
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running")
        own = fake.live("gpuhop-j1-1")[0].instance_id
        extra = fake.add_instance("gpuhop-j1-1")
        await asyncio.sleep(0.3)  # the duplicate bills for a while before it is seen
        await rig.until(lambda: extra in fake.terminated(), "duplicate terminated")
        assert fake.live("gpuhop-j1-1")[0].instance_id == own  # the attempt's own machine runs on
        events = [e for e in rig.store.events("j1") if e.kind == "duplicate"]
        assert len(events) == 1 and extra in events[0].message
        bill = fake.terminated()[extra]
        assert bill is not None and bill.cost_usd > 0.25
        row = _attempts(rig, "j1")[0]
        assert row.duplicate_cost_usd == pytest.approx(bill.cost_usd, rel=0.01)
    finally:
        rig.close()


async def test_a_bill_lost_between_the_stop_and_its_answer_is_asked_for_again(tmp_path: Path) -> None:
    """The fault storm (AWS, 10 s calls) saw a job's cost recorded as $0.0019 against $0.0069
    billed: the machine was stopped, but the stop's answer (with the bill) never arrived, so the
    estimate made when the attempt ended stayed on the books for good, and the listing shows the
    machine terminated, so the reaper never asks again. Now ended attempts whose bill is late are
    stopped again (harmless), the bill replaces the estimate, and the API says which costs are
    still estimates. A provider that no longer knows the machine leaves the estimate standing,
    never priced up to the moment of asking."""
    fake = FakeAdapter.create(tmp_path, prices={"r1": 3600.0})  # $1 a second
    rig = Rig.create(tmp_path, fake)
    try:
        for job_id in ("j1", "j2"):
            _submit(rig, job_id, _spec(name=job_id))
        await rig.until(lambda: all(rig.store.get_job(j).status == JobStatus.RUNNING.value for j in ("j1", "j2")),
                        "jobs running")
        fake.fail_next("terminate", 2, after=True)  # the machines stop; their answers are lost
        for job_id in ("j1", "j2"):
            fake.exit(fake.live(f"gpuhop-{job_id}-1")[0].instance_id, 0)
        await rig.until(lambda: all(rig.store.get_job(j).status == JobStatus.SUCCEEDED.value for j in ("j1", "j2")),
                        "jobs succeeded")
        for _ in range(3):
            await rig.step()
        rows = {j: _attempts(rig, j)[0] for j in ("j1", "j2")}
        assert fake.calls["terminate"] == 2 and not fake.live()
        assert not any(r.cost_final for r in rows.values())
        from orchestrator.api.views import job_out
        view = job_out(rig.store.get_job("j1"), [rows["j1"]])
        assert view.cost_final is False and view.attempts[0].cost_final is False
        del fake.instances[rows["j2"].instance_id or ""]  # j2's machine is forgotten by its provider

        now = time.time()
        await rig.engine.workers.finish_bills(now)  # just ended: not late yet
        await rig.engine.drain()
        assert fake.calls["terminate"] == 2
        with rig.store._write() as s:  # as if they had ended three minutes ago
            s.connection().exec_driver_sql("UPDATE attempts SET ended_at = ended_at - 180")
            s.commit()
        estimate = _attempts(rig, "j2")[0].cost_usd
        rig.engine._last_bill_sweep = 0.0
        await rig.step()  # the tick's sweep asks again
        assert fake.calls["terminate"] == 4
        j1 = _attempts(rig, "j1")[0]
        bill = fake.bill(j1.instance_id or "")
        assert j1.cost_final and j1.cost_usd == pytest.approx(bill.cost_usd, abs=1e-6)
        assert abs(j1.cost_usd - rows["j1"].cost_usd) > 1e-4  # the estimate ended at the tick, the bill at the stop
        j2 = _attempts(rig, "j2")[0]
        assert j2.cost_final and j2.cost_usd == pytest.approx(estimate)  # not priced up to now
        assert job_out(rig.store.get_job("j1"), [j1]).cost_final is True
        await rig.step()
        assert fake.calls["terminate"] == 4  # final now: not asked again
    finally:
        rig.close()


# ----------------------------------------------------------------------------- 3. outages


async def test_daemon_outage_longer_than_heartbeat_timeout_relaunches_nothing(tmp_path: Path) -> None:
    """Issue 7.3: after a daemon outage longer than heartbeat_timeout_seconds, every healthy
    cloud attempt was declared lost. Silence now counts only while the daemon is up."""
    fake = RemoteFake.create(tmp_path)
    rig = Rig.create(tmp_path, fake, heartbeat_timeout_seconds=5.0)
    try:
        _submit(rig, "j1", _spec())
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running")
        row = _attempts(rig, "j1")[0]
        # the agent last reported 60 s ago: the daemon was down (or unreachable) all that time
        rig.store.update_attempt(row.id, last_heartbeat_at=time.time() - 60,
                                 running_at=time.time() - 120, launched_at=time.time() - 130)
    finally:
        rig.close()
    restarted = Rig.create(tmp_path, fake, heartbeat_timeout_seconds=5.0)
    try:
        for _ in range(5):
            await restarted.step()
        rows = _attempts(restarted, "j1")
        assert [(r.number, r.status) for r in rows] == [(1, AttemptStatus.RUNNING.value)]
        assert len(fake.created()) == 1 and not fake.terminated()
        # but a daemon that is up and hears nothing for the whole timeout does call it lost
        restarted.engine.cfg = type(restarted.engine.cfg)(
            **{**restarted.engine.cfg.__dict__, "silence_since": time.time() - 30})
        await restarted.until(lambda: _attempts(restarted, "j1")[0].status == AttemptStatus.ENDED.value,
                              "silent attempt ended")
        assert _attempts(restarted, "j1")[0].end_reason == "lost"
    finally:
        restarted.close()


# ----------------------------------------------------------------------------- 5. slow providers


async def test_a_provider_whose_listings_outlast_the_tick_is_still_seen(tmp_path: Path) -> None:
    """The fault storm's AWS latency scenario: every listing took longer than the gap between
    two ticks, and a listing asked for before the previous tick began was thrown away when it
    came, so the provider was never read and every job stayed launching for good. A listing
    not used before is used by the next tick, whenever it was asked for."""
    fake = FakeAdapter.create(tmp_path)
    rig = Rig.create(tmp_path, fake, listing_wait_seconds=0.02)
    try:
        fake.delays["list"] = 0.25  # ten ticks' worth
        _submit(rig, "j1", _spec())
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running",
                        timeout=20)
        assert len(fake.created()) == 1
        fake.delays["list"] = 30.0  # listings asked from now on do not come back
        await asyncio.sleep(0.4)  # the one in flight does
        await rig.engine.observer.snapshot(time.time(), 0.0)  # uses it, unless a tick did
        snap = await rig.engine.observer.snapshot(time.time(), 0.0)
        assert "fake" not in snap.readable  # one listing judges once: not again at the next tick
    finally:
        for task in asyncio.all_tasks():
            if task.get_name().startswith("list-"):
                task.cancel()
        rig.close()


async def test_tick_does_not_wait_for_slow_listing_or_launch(tmp_path: Path) -> None:
    """Issue 7.5: launches ran inside the tick and listings were awaited by it, so a slow
    provider stretched ticks to minutes. A tick now returns while both are still in flight."""
    fake = FakeAdapter.create(tmp_path)
    rig = Rig.create(tmp_path, fake, listing_wait_seconds=0.05)
    try:
        _submit(rig, "j1", _spec())
        fake.delays["launch"] = 30.0
        await rig.engine.tick()  # places the job: the launch starts beside the tick
        for _ in range(50):
            if fake.calls["launch"]:
                break
            await asyncio.sleep(0.02)
        assert fake.calls["launch"] == 1
        ticks = rig.engine.ticks
        await rig.engine.tick()  # returns although the launch is still sleeping
        assert rig.engine.ticks == ticks + 1 and not fake.created()
        fake.delays["list"] = 30.0
        await rig.engine.tick()
        await rig.engine.tick()  # the listing asked for by the previous tick is still out
        assert rig.engine.ticks == ticks + 3
        assert "fake" not in (await rig.engine.observer.snapshot(time.time(), 0.01)).readable
        assert rig.engine.healthy()
    finally:
        for task in list(rig.engine.workers._tasks):
            task.cancel()
        for task in asyncio.all_tasks():
            if task.get_name().startswith("list-"):
                task.cancel()
        rig.close()


# ----------------------------------------------------------------------------- 6. volumes


async def test_volume_created_only_where_the_launch_lands(tmp_path: Path) -> None:
    """Issue 7.6: a volume was created in every zone a launch tried and the job pinned to the
    last one. Now: created for the offer being launched, deleted again when that launch fails,
    and pinned only where an attempt ran."""
    fake = FakeAdapter.create(tmp_path, capacity={"r1": 0, "r2": 0, "r3": 1},
                              prices={"r1": 0.1, "r2": 0.2, "r3": 0.3})

    rig = Rig.create(tmp_path, fake)
    try:
        # r1 and r2 advertise room that is gone when the launch arrives
        real_launch = fake.launch

        async def launch(req: LaunchRequest) -> ObservedInstance:
            if req.offer.region in ("r1", "r2"):
                fake.calls["launch"] += 1
                raise NoCapacity(f"no capacity in {req.offer.region}", provider="fake")
            return await real_launch(req)

        fake.capacity.update(r1=2, r2=2)
        fake.launch = launch  # type: ignore[method-assign]
        _submit(rig, "j1", _spec(volume="ckpt"))
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running")
        regions = sorted(v.region for v in fake.volumes.values())
        assert regions == ["r3"], regions
        vol = rig.store.volume("ckpt")
        assert (vol.provider, vol.region) == ("fake", "r3")
        assert [e.kind for e in rig.store.events("j1")].count("volume_deleted") >= 2
    finally:
        rig.close()


# ----------------------------------------------------------------------------- 7. cost


async def test_cost_is_the_providers_bill(tmp_path: Path) -> None:
    """Issue 7.7: an attempt was priced from launch to when the daemon noticed its end, not to
    when billing stopped. Its cost is now the provider's final bill."""
    fake = FakeAdapter.create(tmp_path, prices={"r1": 3600.0})
    rig = Rig.create(tmp_path, fake)
    try:
        _submit(rig, "j1", _spec(max_relaunches=0))
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running")
        inst = fake.live("gpuhop-j1-1")[0]
        await asyncio.sleep(0.2)
        fake.preempt(inst.instance_id)  # billing stops now ...
        await asyncio.sleep(0.5)  # ... and the daemon notices later
        await rig.until(lambda: JobStatus(rig.store.get_job("j1").status).terminal, "job ended")
        await rig.engine.drain()
        bill = fake.bill(inst.instance_id)
        row = _attempts(rig, "j1")[0]
        assert row.cost_final
        assert row.cost_usd == pytest.approx(bill.cost_usd, rel=0.01), (row.cost_usd, bill)
    finally:
        rig.close()


# ----------------------------------------------------------------------------- 8. start-up


class FailsToStart(FakeAdapter):
    """A provider whose start-up fails a few times (network, plumbing), then works."""

    failures_left = 2

    async def start(self) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RetryLater("SQS plumbing unavailable", provider=self.name)


async def test_provider_failing_at_start_is_degraded_not_fatal(tmp_path: Path) -> None:
    """Issue 7.8: a provider failing at start aborted the whole daemon. It is now degraded and
    retried while the others run."""
    fake = FailsToStart.create(tmp_path)
    rig = Rig.create(tmp_path, fake, provider_start_backoff_max_seconds=0.3, listing_wait_seconds=0.05)
    try:
        await rig.engine.tick()
        assert not rig.engine.health["fake"].ok
        assert "could not start" in rig.engine.health["fake"].error
        _submit(rig, "j1", _spec())
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running")
        assert rig.engine.health["fake"].ok and fake.failures_left == 0
    finally:
        rig.close()


async def test_retry_later_on_launch_keeps_one_pending_attempt(tmp_path: Path) -> None:
    """A launch whose answer was lost (RetryLater after the effect) keeps its attempt pending and
    is adopted, not launched a second time."""
    fake = FakeAdapter.create(tmp_path)
    rig = Rig.create(tmp_path, fake)
    try:
        fake.fail_next("launch", 1, RetryLater, after=True)
        _submit(rig, "j1", _spec())
        await rig.until(lambda: rig.store.get_job("j1").status == JobStatus.RUNNING.value, "job running")
        assert [e.name for e in fake.created()] == ["gpuhop-j1-1"]
        assert [r.number for r in _attempts(rig, "j1")] == [1]
        assert fake.live("gpuhop-j1-1")[0].state == InstanceState.RUNNING
    finally:
        rig.close()
