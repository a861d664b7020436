"""Launches and terminations as bounded workers beside the tick, never inside it.

It exists because the tick must stay short whatever a provider does: a launch can take tens of
seconds (a slow API, a retry budget), and a tick that waits for it stalls observation, the
agents' acknowledgements and `/healthz`. The tick hands work over and moves on:

* a launch runs as one task per job (never two for one job), at most `launch_concurrency` at
  once and `provider_concurrency` per provider, awaited to its end (no provider call outlives
  its caller, so a slow answer can never create a machine nobody waits for);
* it is write-ahead: the attempt row, with its deterministic name, is committed before the
  provider is called, and a retry of a pending attempt re-issues the same name (adapters look
  the name up before creating);
* a volume is created only for the offer actually being launched; one created for a launch
  that failed is deleted again, and the job's volume is pinned only where an attempt landed;
* a termination returns the provider's final bill, which becomes the attempt's cost; a
  duplicate machine's bill is added to the attempt that its name belongs to.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from adapters.base import (
    Adapter,
    AdapterError,
    NoCapacity,
    PermanentError,
    RetryLater,
    VolumeSupport,
)
from orchestrator import metrics
from orchestrator.config import Settings
from orchestrator.groupcommit import GroupCommit
from orchestrator.models import (
    AttemptStatus,
    Bill,
    CapacityType,
    JobSpec,
    LaunchRequest,
    Offer,
    ProviderVolume,
    attempt_name,
)
from orchestrator.moving import MoveChoice, MoveOption
from orchestrator.observation import Observer, describe
from orchestrator.placement import (
    PlacementResult,
    PlacementSettings,
    RateStats,
    VolumeLocation,
    never_satisfiable,
    place,
)
from orchestrator.relocation import Relocation, moving_settings
from orchestrator.store import (
    AttemptRow,
    Conflict,
    JobRow,
    LaunchRecord,
    LeaseLost,
    Store,
    VolumeRow,
)

log = logging.getLogger("gpuhop.engine")

RESTOP_SECONDS = 300.0
TRIED_PER_PLACEMENT = 8  # candidates a launch tries, best first, before it waits for capacity


@dataclass(frozen=True)
class TerminateOrder:
    """What to stop, and whose bill its cost belongs to."""

    provider: str
    instance_id: str
    attempt_id: int | None = None  # the attempt whose machine (or duplicate) this is
    duplicate: bool = False  # an extra machine carrying a live attempt's name
    price_per_hour: float = 0.0  # for the estimate when the provider cannot tell the bill
    started_at: float | None = None
    last_bill: Bill | None = None  # the latest bill a listing showed for this instance
    # set when asking again for an ended attempt's late bill: the estimate already recorded, which
    # stands if the provider cannot tell (the machine stopped long before this order)
    estimate: tuple[float, float | None] | None = None  # (USD, when it ended)


BILL_SWEEP_AFTER = 120.0  # an ended attempt's bill is asked for again once it is this many seconds late,
BILL_SWEEP_HORIZON = 86_400.0  # for up to a day after it ended (EC2 forgets an instance within hours)


RATE_STATS_MAX_AGE = 5.0  # seconds a read of the preemption history serves placement
NO_FIT_MEMO = 4096  # kinds of job remembered as fitting nothing in the current offers
WRITE_GATHER_SECONDS = 0.01  # how long a "nothing launched" note waits for others to share its commit
NOTE_BATCH = 256  # at most this many notes per commit: the store's writer lock is held that long


class Workers:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        adapters: dict[str, Adapter],
        observer: Observer,
        placement: PlacementSettings,
        token_for: Callable[[str], str],
        on_change: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.adapters = adapters
        self.observer = observer
        self.placement = placement
        self.token_for = token_for
        self.on_change = on_change
        self.prefix = settings.server.instance_prefix
        eng = settings.engine
        self._launch_concurrency = eng.launch_concurrency
        self._launch_queue: deque[tuple[str, Callable[[], Awaitable[None]], str]] = deque()
        self._launch_workers = 0
        self._provider_slots = {name: asyncio.Semaphore(eng.provider_concurrency) for name in adapters}
        self._launching: set[str] = set()  # job ids with a launch in flight
        # placements that found nothing, by what decides that, for the offer index they ran on
        self._no_fit_index: object = None
        self._no_fit: dict[tuple[object, ...], tuple[PlacementResult, str | None]] = {}
        # job id -> when (monotonic) its last launch ended: a tick that read the store before
        # that must not launch the job again (its view predates the attempt that launch wrote)
        self._launch_ended: dict[str, float] = {}
        self._terminating: set[tuple[str, str]] = set()
        self._terminated: dict[tuple[str, str], float] = {}  # confirmed stops, and when
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoff: dict[str, float] = {}
        self._avoid: dict[str, set[str]] = {}  # job -> "provider:offer_id" to skip on its next placement
        self.peer_urls: list[str] = []  # other live replicas (cluster): agents fail over to them
        self._rates: tuple[float, dict[tuple[str, CapacityType], RateStats]] | None = None
        self._rates_lock = asyncio.Lock()
        self._open_batch: tuple[list[Any], asyncio.Future[None]] | None = None  # see _write_soon
        # the write-ahead records of launches and their confirmed machines, each written with
        # the others that arrive meanwhile (orchestrator/groupcommit.py)
        self.write_ahead: GroupCommit[AttemptRow, AttemptRow] = GroupCommit(store.run, store.add_attempts)
        self.launch_records: GroupCommit[LaunchRecord, bool] = GroupCommit(store.run, store.record_launches)
        self.write_gather_seconds = WRITE_GATHER_SECONDS
        self._notes: dict[str, asyncio.Future[None]] = {}  # job id -> the batch its launch's note is in
        self.settled: set[str] = set()  # jobs whose launch ended since the engine last took them
        self._closing = False  # see stop_launching
        self._sweeping: asyncio.Future[None] | None = None
        self._billing: asyncio.Future[None] | None = None
        self.relocation = Relocation(store, adapters, moving_settings(settings.moving), placement,
                                     self._provider_slots, self.prefix)

    # ------------------------------------------------------------------ bookkeeping

    def launching(self, job_id: str) -> bool:
        return job_id in self._launching

    def terminating(self, provider: str, instance_id: str) -> bool:
        return (provider, instance_id) in self._terminating

    def stopping_or_stopped(self, provider: str, instance_id: str) -> bool:
        """A stop is in flight, or the provider confirmed one recently: listings go on showing
        a stopped machine for a while (EC2: an hour), and it must not be stopped again and
        again. After `RESTOP_SECONDS` a machine still listed as not gone is stopped again."""
        key = (provider, instance_id)
        if key in self._terminating:
            return True
        done = self._terminated.get(key)
        return done is not None and time.time() - done < RESTOP_SECONDS

    @staticmethod
    async def _logged(work: Awaitable[None], name: str) -> None:
        """Run one piece of work; what it raises is logged and counted, never propagated."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:  # the job went to another replica: its engine takes over
            log.warning("worker %s stopped: %s", name, exc)
        except Exception:  # a bug in one worker must not go unnoticed, nor kill the daemon
            log.exception("worker %s failed", name)
            metrics.TICK_ERRORS.inc()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.create_task(self._logged(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop_launching(self) -> None:
        """The daemon is stopping: launches still waiting for a slot give up (nothing of theirs
        is recorded or made yet; the next start places those jobs again). With 20,000 queued
        jobs the daemon otherwise waited out drain's whole grace. Launches under way finish."""
        self._closing = True
        while self._launch_queue:
            self._launch_done(self._launch_queue.popleft()[0])

    async def drain(self, grace: float | None = None) -> None:
        """Wait for the launches and terminations in flight (they decide money: never abandon
        them lightly). With `grace`, give up waiting after that many seconds."""
        deadline = None if grace is None else time.monotonic() + grace
        while True:
            if self._open_batch is not None:  # notes of launches that ended: written now, not
                self._flush_soon(self._open_batch)  # write_gather_seconds later
            if not self._tasks:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            await asyncio.wait(list(self._tasks), timeout=left)

    # ------------------------------------------------------------------ launches

    def avoid(self, job_id: str, offer_key: str) -> None:
        """The job's next placement skips this offer (its launch was accepted, then failed)."""
        self._avoid.setdefault(job_id, set()).add(offer_key)

    def fresh(self, job_id: str, read_at: float) -> bool:
        """No launch of this job is in flight or ended after `read_at` (time.monotonic()): a
        view of the job read at `read_at` is still the whole truth about its attempts."""
        return job_id not in self._launching and self._launch_ended.get(job_id, float("-inf")) < read_at

    def forget(self, active: AbstractSet[str]) -> None:
        """Drop what is kept about jobs that are no longer active."""
        self.forget_jobs({k for table in (self._launch_ended, self._backoff, self._avoid) for k in table
                          if k not in active})

    def forget_jobs(self, gone: Iterable[str]) -> None:
        """Drop what is kept about these jobs (no longer active)."""
        for job_id in gone:
            for table in (self._launch_ended, self._backoff, self._avoid):
                table.pop(job_id, None)

    def launch_soon(self, job: JobRow, spec: JobSpec, early: bool, number: int | None = None) -> None:
        """Start a launch of the job's next attempt (`number`: as the caller's fresh read of its
        attempts says; None: read it)."""
        if job.id in self._launching:
            return
        if not early and job.next_try_at is not None and time.time() < job.next_try_at:
            return
        self._queue(job.id, functools.partial(self._launch, job, spec, early, number), f"launch-{job.id}")

    def relaunch_soon(self, job: JobRow, spec: JobSpec, row: AttemptRow) -> None:
        if job.id in self._launching:
            return
        self._queue(job.id, functools.partial(self._relaunch_pending, job, spec, row), f"relaunch-{row.name}")

    def _queue(self, job_id: str, work: Callable[[], Awaitable[None]], name: str) -> None:
        """Launches wait in a queue served by at most `launch_concurrency` worker tasks. (A task
        per waiting launch meant 10,000 queued jobs kept 250,000 coroutines, futures and
        contexts alive: every full collection walked them, a 100-175 ms stall of the API.)"""
        self._launching.add(job_id)
        self._launch_queue.append((job_id, work, name))
        if self._launch_workers < self._launch_concurrency:
            self._launch_workers += 1
            self._spawn(self._launch_worker(), "launch-worker")

    async def _launch_worker(self) -> None:
        try:
            while self._launch_queue and not self._closing:
                job_id, work, name = self._launch_queue.popleft()
                try:
                    await self._logged(work(), name)  # a launch that fails does not stop the others
                finally:
                    note = self._notes.pop(job_id, None)
                    if note is None or note.done():
                        self._launch_done(job_id)
                    else:  # launched nothing: over once its note is written (see _launch's end)
                        note.add_done_callback(functools.partial(self._note_written, job_id))
        finally:
            self._launch_workers -= 1

    def _launch_done(self, job_id: str) -> None:
        self._launch_ended[job_id] = time.monotonic()
        self._launching.discard(job_id)
        self.settled.add(job_id)
        self.on_change()

    def _note_written(self, job_id: str, _note: asyncio.Future[None]) -> None:
        self._launch_done(job_id)

    def take_settled(self) -> set[str]:
        """The jobs whose launch ended since the last call: the engine decides each again then,
        and not every tick while it is in flight (10,000 queued jobs were each passed over
        every tick until their turn came)."""
        out, self.settled = self.settled, set()
        return out

    async def _call_launch(self, adapter: Adapter, req: LaunchRequest) -> object:
        async with self._provider_slots[req.offer.provider]:
            return await adapter.launch(req)

    def _request(self, job: JobRow, spec: JobSpec, number: int, offer: Offer,
                 volume: ProviderVolume | None) -> LaunchRequest:
        name = attempt_name(self.prefix, job.id, number)
        env = dict(spec.env)
        env.update(
            GPUHOP_JOB_ID=job.id, GPUHOP_ATTEMPT=str(number), GPUHOP_ATTEMPT_NAME=name,
            # this replica first, then the others: an agent whose replica is gone reports to another
            GPUHOP_CALLBACK_URL=" ".join(f"{base}/v1/agent/report" for base in
                                         [self.settings.server.agent_base_url(), *self.peer_urls]),
            GPUHOP_TOKEN=self.token_for(name), GPUHOP_HEARTBEAT=str(self.settings.engine.heartbeat_seconds),
        )
        if spec.volume is not None and spec.volume.sync == "object-store" and self.settings.storage is not None:
            # the agent restores the volume before the job starts and uploads it this often
            env["GPUHOP_SYNC_SECONDS"] = str(self.settings.storage.sync_interval_seconds)
        if spec.workdir_sha256:  # the agent fetches it from the daemon, never through the launch request
            env.update(GPUHOP_WORKDIR=spec.workdir_sha256,
                       GPUHOP_WORKDIR_MAX=str(int(self.settings.workdirs.max_unpacked_mb * 1024 * 1024)))
        return LaunchRequest(
            name=name, idempotency_key=f"{name}-{hashlib.sha1(offer.offer_id.encode()).hexdigest()[:10]}"[-64:],
            job_id=job.id, attempt=number, offer=offer, image=spec.image, command=list(spec.command), env=env,
            disk_gb=spec.resources.disk_gb, volume=volume,
            mount_path=spec.volume.mount_path if spec.volume else "/workspace",
            bid_price_per_hour=offer.price_per_hour if offer.capacity == CapacityType.SPOT else None,
            min_cuda=spec.resources.min_cuda,
        )

    async def rate_stats(self) -> dict[tuple[str, CapacityType], RateStats]:
        """Preemptions and hours per kind of capacity, for placement. Read at most every
        RATE_STATS_MAX_AGE seconds: it adds up every live attempt's hours, and a hundred jobs
        relaunched at once (a zone reclaimed) each asked for it (issue 9: detection to launch)."""
        async with self._rates_lock:
            if self._rates is not None and time.monotonic() - self._rates[0] < RATE_STATS_MAX_AGE:
                return self._rates[1]
            rows = await self.store.run(self.store.preemption_history)
            out: dict[tuple[str, CapacityType], RateStats] = {}
            for provider, capacity, n, hours in rows:
                try:
                    out[(provider, CapacityType(capacity))] = RateStats(n, hours)
                except ValueError:
                    continue
            self._rates = (time.monotonic(), out)
            return out

    async def _volume_for(self, spec: JobSpec, offer: Offer, pinned: VolumeRow | None
                          ) -> tuple[ProviderVolume | None, bool]:
        """The volume for a launch of `offer`, and whether it is new (not the job's pinned
        volume, so it must be deleted again if the launch fails)."""
        if spec.volume is None:
            return None, False
        adapter = self.adapters[offer.provider]
        if not isinstance(adapter, VolumeSupport):
            raise PermanentError(f"{offer.provider} does not support volumes", provider=offer.provider)
        if (pinned is not None and pinned.provider_volume_id and pinned.provider == offer.provider
                and pinned.region == offer.region):
            return ProviderVolume(offer.provider, pinned.provider_volume_id, pinned.name, offer.region,
                                  pinned.size_gb), False
        async with self._provider_slots[offer.provider]:
            vol = await adapter.ensure_volume(spec.volume.name, spec.volume.size_gb, offer.region)
        return vol, True

    async def _drop_volume(self, vol: ProviderVolume, job_id: str, why: str) -> None:
        adapter = self.adapters.get(vol.provider)
        if not isinstance(adapter, VolumeSupport):
            return
        try:
            async with self._provider_slots[vol.provider]:
                await adapter.delete_volume(vol.volume_id)
        except Exception as exc:  # it holds nothing; a later launch there finds it by name
            log.warning("could not delete unused %s volume %s: %s", vol.provider, vol.volume_id, describe(exc))
            return
        await self.store.run(self.store.add_event, job_id, "volume_deleted",
                             f"deleted volume {vol.volume_id} in {vol.region}, created for a launch that failed: {why}")

    async def _launch(self, job: JobRow, spec: JobSpec, early: bool, number: int | None = None) -> None:
        """Place the job and start a new attempt, trying candidates best first."""
        timeout = self.settings.engine.provider_timeout_seconds
        offers_by_provider = await self.observer.offers(wait=timeout)
        # a provider whose last listing failed may still launch (at 50% faults most calls work):
        # its offers stay in play, and a launch that fails says so itself
        index = await self.observer.offer_index([name for name in offers_by_provider if self.observer.launchable(name)])
        pinned: VolumeRow | None = None
        location: VolumeLocation | None = None
        if spec.volume is not None:
            pinned = await self.store.run(self.store.volume, spec.volume.name)
            if pinned is not None and pinned.move_attempt is not None:  # a move a crash left: settle it first
                pinned = await self.relocation.settle(pinned.name)
                if pinned is not None and pinned.move_attempt is not None:
                    await self.store.run(self.store.add_event, job.id, "launch_retry",
                                         f"volume {pinned.name!r} is still moving for {pinned.move_attempt}")
                    return
            location = VolumeLocation(pinned.provider if pinned else None, pinned.region if pinned else None)
        avoid = frozenset(self._avoid.pop(job.id, ()))  # offers whose launch just failed after acceptance
        rates = await self.rate_stats()
        # what fits depends on the job's asks, its volume's place, the offers and the ones just
        # refused, not on rates (they only rank): a job like one that found nothing in these
        # same offers finds nothing either, without filtering them again (issue 9: thousands
        # of jobs waiting for one kind of GPU)
        memo_key = (spec.resources.model_dump_json(), spec.placement.model_dump_json(), spec.volume is not None,
                    location, avoid)
        if index is not self._no_fit_index:
            self._no_fit_index, self._no_fit = index, {}
        known = self._no_fit.get(memo_key) if spec.volume is None or spec.volume.sync != "object-store" else None
        if known is not None:
            result, never = known
        else:
            result = place(spec, index, location, rates, self.placement, exclude=avoid, limit=TRIED_PER_PLACEMENT)
            never = None if result.candidates else never_satisfiable(spec, index)  # a job queued with --force
            if not result.candidates and len(self._no_fit) < NO_FIT_MEMO:
                self._no_fit[memo_key] = (result, never)
        if number is None:
            number = await self.store.run(self.store.next_attempt_number, job.id)
        tried: list[str] = []
        choice: MoveChoice | None = None
        if (not result.candidates and spec.volume is not None and spec.volume.sync == "object-store"
                and pinned is not None and pinned.provider is not None and pinned.provider_volume_id
                and self._lists_offers(pinned.provider, offers_by_provider)):
            # nothing where the volume lives, and its content is in the object store: weigh waiting
            # against moving (orchestrator/moving.py)
            choice = await self.relocation.choose(job.id, spec, index, pinned, rates, avoid)
            for option in choice.options:
                outcome = await self._launch_moved(job, spec, number, option, pinned, early)
                if outcome is None:
                    return  # launched, or left pending for the tick to settle
                tried.append(outcome)
        for cand in result.candidates:
            offer = cand.offer
            row = AttemptRow(
                job_id=job.id, number=number, name=attempt_name(self.prefix, job.id, number),
                provider=offer.provider, region=offer.region, offer_id=offer.offer_id,
                capacity=offer.capacity.value, gpu=offer.gpu, gpu_count=offer.gpu_count,
                price_per_hour=offer.price_per_hour, status=AttemptStatus.PENDING.value,
                placement_reason=cand.reason[:1024], created_at=time.time(),
            )
            volume: ProviderVolume | None = None
            new_volume = False
            try:
                volume, new_volume = await self._volume_for(spec, offer, pinned)
                if volume is not None:
                    row.volume_id = volume.volume_id
                row = await self.write_ahead.submit(row)  # write-ahead
                req = self._request(job, spec, number, offer, volume)
                inst = await self._call_launch(self.adapters[offer.provider], req)
            except (NoCapacity, PermanentError) as exc:
                tried.append(f"{offer.provider}/{offer.region} {offer.gpu or 'cpu'}: {describe(exc)}")
                if row.id is not None:
                    await self.store.run(self.store.delete_attempt, row.id)
                if volume is not None and new_volume:
                    await self._drop_volume(volume, job.id, describe(exc))
                self.observer.invalidate_offers(offer.provider)
                continue
            except Conflict as exc:  # the store refused a second live attempt (or this number): never launch
                log.warning("job %s: attempt %s not launched: %s", job.id, number, exc)
                if volume is not None and new_volume:
                    await self._drop_volume(volume, job.id, str(exc))
                return
            except (RetryLater, AdapterError, OSError, TimeoutError) as exc:
                # the launch may or may not have happened: keep the attempt pending (with its
                # volume); the next observation adopts the instance, or the launch is re-issued
                # under the same name, which the adapter looks up first
                if row.id is not None:
                    what = f"launch of attempt {number} on {offer.provider} unconfirmed: {describe(exc)}"
                else:  # nothing was launched: the volume could not be had; try again next tick
                    what = f"volume for attempt {number} on {offer.provider} {offer.region} unavailable: {describe(exc)}"
                log.info("job %s: %s", job.id, what)
                await self.store.run(self.store.add_event, job.id, "launch_retry", what, number)
                return
            await self._launched(job, spec, row, inst, volume, f"attempt {number} launched"
                                 f"{' ahead of a reclaim' if early else ''}: {cand.reason}")
            self.observer.refresh_offers_soon(offer.provider)
            metrics.LAUNCHES.labels(offer.provider, offer.capacity.value).inc()
            return
        # nothing could be launched: wait, with a growing pause
        delay = min(self.settings.engine.retry_backoff_max_seconds, self._backoff.get(job.id, 1.0) * 2)
        self._backoff[job.id] = delay
        if not tried and choice is None:
            # nothing in the offers fits: trying again before they are read again can only find
            # the same nothing (at 1,000 submits a second of such jobs, tries at 2, 4 and 8 s
            # were twice the database writes of the submits themselves, issue 9)
            delay = min(self.settings.engine.retry_backoff_max_seconds,
                        max(delay, self.observer.next_offers_in(list(offers_by_provider))))
        why = "; ".join(tried) if tried else result.summary()
        if choice is not None:
            why = f"{choice.reason}; {why}"
        if tried:
            never = None
        suspended = [f"{name} suspended for launches ({h.suspended_why})"
                     for name, h in self.observer.health.items() if h.suspended_until and name in offers_by_provider]
        if suspended:
            why = "; ".join([why, *suspended])
        note = self._write_soon((job.id, {"next_try_at": time.time() + delay,
                                          "message": (never or f"waiting for capacity: {why}")[:1024]},
                                 {}, [(None, "no_capacity", f"nothing launched, next try in {delay:.0f} s: {why}")]))
        if self._open_batch is not None and self._open_batch[1] is note:
            # the launch stays in flight until its note is written (its job is not decided again
            # before), but the worker goes on to the next job: a thousand jobs that nothing fits
            # share a few commits instead of one per `launch_concurrency` of them (issue 9)
            self._notes[job.id] = note
            return
        await asyncio.shield(note)  # the batch is full and being written: wait for it (backpressure)

    def _lists_offers(self, provider: str, offers_by_provider: dict[str, list[Offer]]) -> bool:
        """Whether "no capacity" at `provider` can be believed: it is configured here, started,
        not suspended, and listing offers. A provider that is starting or failing says nothing
        about its capacity, and a job must not move for an API blip. One no longer configured
        here cannot take the job back at all: moving is the only way on."""
        if provider not in self.adapters:
            return True
        return self.observer.launchable(provider) and bool(offers_by_provider.get(provider))

    async def _launch_moved(self, job: JobRow, spec: JobSpec, number: int, option: MoveOption, pinned: VolumeRow,
                            early: bool) -> str | None:
        """Launch attempt `number` at a place away from the job's volume, on a new volume made
        there (the content comes from the object store). None: launched, or left pending for
        the tick; else why this place did not work (the next one is tried).

        Money safety: the move is recorded on the volume row before the new volume is made and
        its id as soon as it exists, so a crash at any point leaves every provider volume on the
        books (store.moves); `_launched` makes the move final and retires the old volume."""
        offer = option.candidate.offer
        vol_spec = spec.volume
        adapter = self.adapters[offer.provider]
        place_name = f"{offer.provider}/{offer.region} {offer.gpu or 'cpu'}"
        if vol_spec is None or not isinstance(adapter, VolumeSupport):
            return f"{place_name}: no volume support"
        name = attempt_name(self.prefix, job.id, number)
        refused = await self.store.run(self.store.begin_volume_move, vol_spec.name, pinned.provider_volume_id,
                                       offer.provider, offer.region, name)
        if refused is not None:
            return f"{place_name}: {refused}"
        try:
            async with self._provider_slots[offer.provider]:
                volume = await adapter.ensure_volume(vol_spec.name, vol_spec.size_gb, offer.region)
        except Exception as exc:  # it may exist or not: the move stays recorded and is settled later
            await self._settle(vol_spec.name)
            return f"{place_name}: volume unavailable: {describe(exc)}"
        await self.store.run(self.store.set_move_volume, vol_spec.name, name, volume.volume_id)
        row = AttemptRow(
            job_id=job.id, number=number, name=name, provider=offer.provider, region=offer.region,
            offer_id=offer.offer_id, capacity=offer.capacity.value, gpu=offer.gpu, gpu_count=offer.gpu_count,
            price_per_hour=offer.price_per_hour, status=AttemptStatus.PENDING.value, volume_id=volume.volume_id,
            placement_reason=option.reason[:1024], transfer_cost_usd=round(option.cost.transfer_usd, 6),
            created_at=time.time(),
        )
        try:
            row = await self.write_ahead.submit(row)  # write-ahead
            inst = await self._call_launch(adapter, self._request(job, spec, number, offer, volume))
        except (NoCapacity, PermanentError) as exc:
            if row.id is not None:
                await self.store.run(self.store.delete_attempt, row.id)
            await self._settle(vol_spec.name)  # never launched: retire the new volume
            self.observer.invalidate_offers(offer.provider)
            return f"{place_name}: {describe(exc)}"
        except Conflict as exc:
            log.warning("job %s: moved attempt %s not launched: %s", job.id, number, exc)
            await self._settle(vol_spec.name)
            return None
        except (RetryLater, AdapterError, OSError, TimeoutError) as exc:
            # maybe launched: the attempt stays pending with the move; the tick adopts the machine or
            # re-issues the launch, and the move is settled by what becomes of the attempt
            what = f"launch of moved attempt {number} on {offer.provider} unconfirmed: {describe(exc)}"
            log.info("job %s: %s", job.id, what)
            await self.store.run(self.store.add_event, job.id, "launch_retry", what, number)
            return None
        await self._launched(job, spec, row, inst, volume, f"attempt {number} launched"
                             f"{' ahead of a reclaim' if early else ''}: {option.reason}")
        self.observer.refresh_offers_soon(offer.provider)
        metrics.LAUNCHES.labels(offer.provider, offer.capacity.value).inc()
        return None

    async def _settle(self, volume_name: str) -> None:
        """Settle a move this launch worker gave up on; a failure leaves it recorded for the sweep."""
        try:
            await self.relocation.settle(volume_name)
        except Exception as exc:
            log.warning("settling the move of volume %s failed (the sweep retries): %s", volume_name, describe(exc))

    async def _delete_retired(self) -> None:
        await self.relocation.delete_retired()

    async def sweep_moves(self, owned: Callable[[str], bool], leader: bool) -> None:
        """Settle moves left by a crash or an adopted launch; delete retired volumes."""
        await self.relocation.sweep(self.launching, owned, leader)

    def sweep_moves_soon(self, owned: Callable[[str], bool], leader: bool) -> None:
        """`sweep_moves` in the background, one at a time."""
        if self._sweeping is None or self._sweeping.done():
            self._sweeping = asyncio.ensure_future(self.sweep_moves(owned, leader))
            self._spawn(self._sweeping, "sweep-moves")

    def _write_soon(self, item: tuple[str, dict[str, Any], dict[int, dict[str, Any]],
                                      list[tuple[int | None, str, str]]]) -> asyncio.Future[None]:
        """Write a job's "nothing launched" note together with the other launches' that end
        within WRITE_GATHER_SECONDS (one transaction for them all: with a thousand jobs queued
        for capacity, these notes were most of the daemon's database time, issue 9). The
        future is done once it is written (or the write failed: `_flush` logs that)."""
        loop = asyncio.get_running_loop()
        batch = self._open_batch
        if batch is None:
            batch = self._open_batch = ([], loop.create_future())
            batch[1].add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: _flush logs it
            loop.call_later(self.write_gather_seconds, self._flush_soon, batch)
        batch[0].append(item)
        if len(batch[0]) >= NOTE_BATCH:
            self._flush_soon(batch)
        return batch[1]

    def _flush_soon(self, batch: tuple[list[Any], asyncio.Future[None]]) -> None:
        if self._open_batch is batch:
            self._open_batch = None  # what arrives from now on goes into the next batch
            self._spawn(self._flush(batch), "flush-notes")

    async def _flush(self, batch: tuple[list[Any], asyncio.Future[None]]) -> None:
        try:
            await self.store.run(self.store.apply_many, batch[0])
        except BaseException as exc:
            if not batch[1].done():
                batch[1].set_exception(exc)
            raise
        if not batch[1].done():
            batch[1].set_result(None)

    async def _launched(self, job: JobRow, spec: JobSpec, row: AttemptRow, inst: object,
                        volume: ProviderVolume | None, message: str) -> None:
        """Record a launch the provider confirmed. The job's status is the tick's to set; if the
        attempt was ended meanwhile (a cancel), the new machine is stopped at once."""
        instance_id = getattr(inst, "instance_id", "")
        self._backoff.pop(job.id, None)
        if volume is not None and job.volume_name:
            # first, whatever became of the attempt: the volume exists at the provider now and
            # must stay on the books (listed, priced, deletable) even if the job was cancelled
            # and the volume's row removed while this launch was in flight. A move's volume
            # becomes the row's in the transaction that retires the old one
            moved = row.transfer_cost_usd is not None and await self.store.run(  # only moves write it
                self.store.commit_volume_move, job.volume_name, row.name, volume.volume_id,
                f"left behind when attempt {row.number} moved the job to {volume.provider} {volume.region}")
            if moved:
                await self.store.run(self.store.add_event, job.id, "volume_moved",
                                     f"volume {job.volume_name!r} now lives in {volume.provider} {volume.region} "
                                     f"({volume.volume_id}); the old one is deleted", row.number)
                self._spawn(self._delete_retired(), f"retire-volumes-{job.id}")
            elif not await self.store.run(self.store.set_volume_location, job.volume_name, volume.provider,
                                          volume.region, volume.volume_id, spec.volume):
                log.warning("volume %s was removed while a launch created it at %s (%s); recorded it again",
                            job.volume_name, volume.provider, volume.volume_id)
        try:
            recorded = await self.launch_records.submit(LaunchRecord(
                row.id or 0, instance_id, row.launched_at or time.time(),
                {"next_try_at": None, "message": f"attempt {row.number} on {row.provider} {row.region}"},
                [(row.number, "launched", message)]))
        except LeaseLost as exc:
            # another replica owns the job now: it finds this machine by the attempt's name
            # (adopting it, or re-issuing the launch, which the provider answers with it)
            log.warning("attempt %s launched as %s, but %s; its new owner adopts it", row.name, instance_id, exc)
            return
        if not recorded:
            log.info("attempt %s ended while its launch was in flight; stopping %s", row.name, instance_id)
            self.terminate_soon(TerminateOrder(row.provider, instance_id, attempt_id=row.id,
                                               price_per_hour=row.price_per_hour, started_at=time.time()))

    async def _relaunch_pending(self, job: JobRow, spec: JobSpec, row: AttemptRow) -> None:
        """Re-issue a pending attempt's launch under its own name (idempotent)."""
        offer = Offer(
            provider=row.provider, offer_id=row.offer_id, region=row.region, gpu=row.gpu, gpu_count=row.gpu_count,
            vram_gb=0, vcpu=0, memory_gb=0, disk_gb=0, capacity=CapacityType(row.capacity or "on-demand"),
            price_per_hour=row.price_per_hour,
        )
        adapter = self.adapters.get(row.provider)
        if adapter is None:
            return
        volume: ProviderVolume | None = None
        pinned: VolumeRow | None = None
        if spec.volume is not None and row.volume_id:
            pinned = await self.store.run(self.store.volume, spec.volume.name)
            volume = ProviderVolume(row.provider, row.volume_id, spec.volume.name, row.region, spec.volume.size_gb)
        req = self._request(job, spec, row.number, offer, volume)
        try:
            inst = await self._call_launch(adapter, req)
        except (NoCapacity, PermanentError) as exc:
            await self.store.run(self.store.delete_attempt, row.id or 0)
            await self.store.run(self.store.add_event, job.id, "launch_failed",
                                 f"pending attempt {row.number} dropped: {describe(exc)}", row.number)
            if pinned is not None and pinned.move_attempt == row.name:
                await self._settle(pinned.name)  # retires the move's volume
            elif volume is not None and (pinned is None or pinned.provider_volume_id != volume.volume_id):
                await self._drop_volume(volume, job.id, describe(exc))
            return
        except Exception as exc:
            log.info("relaunch of pending %s unconfirmed: %s", row.name, describe(exc))
            return
        await self._launched(job, spec, row, inst, volume, f"attempt {row.number} launched (re-issued)")

    # ------------------------------------------------------------------ terminations

    def terminate_soon(self, order: TerminateOrder) -> None:
        key = (order.provider, order.instance_id)
        adapter = self.adapters.get(order.provider)
        if adapter is None or not order.instance_id or key in self._terminating:
            return
        self._terminating.add(key)
        self._spawn(self._terminate(adapter, order), f"terminate-{order.provider}-{order.instance_id}")

    def finish_bills_soon(self, now: float) -> None:
        """`finish_bills` in the background, one sweep at a time."""
        if self._billing is None or self._billing.done():
            self._billing = asyncio.ensure_future(self.finish_bills(now))
            self._spawn(self._billing, "finish-bills")

    async def finish_bills(self, now: float) -> None:
        """Ask again for the final bill of ended attempts that never got one: their machines
        are stopped again (always right for an ended attempt, and harmless: providers answer a
        second stop of a gone machine with its bill or with nothing), and the answer replaces
        the estimate. A kill -9 between a stop and its bill otherwise left the estimate on the
        books for good: no minimum charge, the end when the tick decided it (the fault storm
        saw $0.0019 recorded against $0.0069 billed)."""
        rows = await self.store.run(self.store.unbilled_attempts, now - BILL_SWEEP_HORIZON, now - BILL_SWEEP_AFTER)
        for row in rows:
            if row.provider in self.adapters and row.instance_id:
                self.terminate_soon(TerminateOrder(
                    row.provider, row.instance_id, attempt_id=row.id, price_per_hour=row.price_per_hour,
                    started_at=row.bill_started_at or row.launched_at, estimate=(row.cost_usd, row.ended_at)))

    async def _terminate(self, adapter: Adapter, order: TerminateOrder) -> None:
        key = (order.provider, order.instance_id)
        try:
            try:
                async with self._provider_slots[order.provider]:
                    bill = await adapter.terminate(order.instance_id)
            except Exception as exc:  # the reaper will retry on a later tick
                metrics.PROVIDER_ERRORS.labels(order.provider, "terminate").inc()
                log.warning("terminate %s %s failed (will retry): %s", order.provider, order.instance_id,
                            describe(exc))
                return
            log.info("terminated %s instance %s", order.provider, order.instance_id)
            now = time.time()
            self._terminated[key] = now
            if len(self._terminated) > 10_000:  # forget the oldest: they are long gone
                for old in sorted(self._terminated, key=self._terminated.__getitem__)[:5_000]:
                    del self._terminated[old]
            if order.attempt_id is not None:
                await self._record_bill(order, bill, time.time())
        finally:
            self._terminating.discard(key)
            self.on_change()

    async def _record_bill(self, order: TerminateOrder, bill: Bill | None, confirmed_at: float) -> None:
        """The attempt's cost from the provider's final bill (or, when it cannot tell, the last
        bill a listing showed, or the estimate a late bill's order carries, or price x time until
        the termination was confirmed)."""
        if bill is None and order.last_bill is not None and order.last_bill.ended_at is not None:
            bill = order.last_bill
        start: float | None
        end: float | None
        if bill is not None:
            cost, start, end = bill.cost_usd, bill.started_at, bill.ended_at or confirmed_at
        elif order.estimate is not None:
            start, (cost, end) = order.started_at, order.estimate
        else:
            start, end = order.started_at, confirmed_at
            cost = max(0.0, end - start) * order.price_per_hour / 3600.0 if start is not None else 0.0
        attempt_id = order.attempt_id or 0
        if order.duplicate:
            await self.store.run(self.store.add_duplicate_cost, attempt_id, round(cost, 6))
            return
        await self.store.run(self.store.finalize_cost, attempt_id, round(cost, 6), start, end)
