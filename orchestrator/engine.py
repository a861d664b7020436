"""The reconcile loop: observe every provider once, decide each job with `reconcile.decide`,
act write-ahead, record, and sleep until the next tick or an early hint.

Money safety lives here. A launch is recorded (attempt row, deterministic name) before the
provider is called, so a crash between the two is healed by the next observation rather than
paid for twice; terminations are idempotent; and the orphan reaper stops any instance that
carries our prefix but no live attempt. Provider calls run concurrently, each bounded by a
timeout, and a provider that fails is marked degraded without stalling the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from adapters.base import (
    Adapter,
    AdapterError,
    InterruptionSupport,
    NoCapacity,
    PermanentError,
    RetryLater,
    VolumeSupport,
)
from orchestrator import metrics, reconcile
from orchestrator.config import Settings
from orchestrator.models import (
    AttemptStatus,
    CapacityType,
    EndReason,
    Instance,
    InstanceState,
    JobSpec,
    JobStatus,
    LaunchRequest,
    Offer,
    ProviderVolume,
    attempt_name,
    parse_attempt_name,
)
from orchestrator.placement import PlacementSettings, RateStats, VolumeLocation, place
from orchestrator.store import AttemptRow, JobRow, Store

log = logging.getLogger("gpuhop.engine")


@dataclass
class ProviderHealth:
    ok: bool = True
    error: str = ""
    since: float = 0.0
    last_ok: float = 0.0


@dataclass
class OfferCache:
    offers: list[Offer] = field(default_factory=list)
    fetched_at: float = 0.0


def placement_settings(settings: Settings) -> PlacementSettings:
    p = settings.placement
    return PlacementSettings(
        prior_rates={(name, CapacityType.SPOT): rate for name, rate in p.spot_preemption_priors.items()},
        prior_weight_hours=p.prior_weight_hours,
        restart_overhead_seconds=dict(p.restart_overhead_seconds),
        default_restart_overhead_seconds=p.default_restart_overhead_seconds,
    )


def attempt_view(row: AttemptRow) -> reconcile.AttemptView:
    return reconcile.AttemptView(
        id=row.id or 0, number=row.number, name=row.name, provider=row.provider,
        status=AttemptStatus(row.status), price_per_hour=row.price_per_hour, instance_id=row.instance_id,
        launched_at=row.launched_at, running_at=row.running_at, ended_at=row.ended_at,
        end_reason=EndReason(row.end_reason) if row.end_reason else None, cost_usd=row.cost_usd,
        agent_state=row.agent_state, exit_code=row.exit_code, exit_signal=row.exit_signal,
        sigterm_received=row.sigterm_received, last_heartbeat_at=row.last_heartbeat_at,
        interruption_at=row.interruption_at, stop_requested_at=row.stop_requested_at,
    )


def job_view(row: JobRow, spec: JobSpec) -> reconcile.JobView:
    return reconcile.JobView(
        id=row.id, status=JobStatus(row.status), policy=spec.policy, cancel_requested=row.cancel_requested,
        relaunches=row.relaunches, retries=row.retries, next_try_at=row.next_try_at,
    )


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        adapters: dict[str, Adapter],
        token_for: Callable[[str], str],
    ) -> None:
        self.settings = settings
        self.store = store
        self.adapters = adapters
        self.token_for = token_for
        self.prefix = settings.server.instance_prefix
        self.health: dict[str, ProviderHealth] = {name: ProviderHealth() for name in adapters}
        self.offer_cache: dict[str, OfferCache] = {name: OfferCache() for name in adapters}
        self.placement = placement_settings(settings)
        self.cfg = reconcile.Settings(
            launch_grace_seconds=settings.engine.launch_grace_seconds,
            heartbeat_timeout_seconds=settings.engine.heartbeat_timeout_seconds,
            remote_providers=frozenset(n for n, a in adapters.items() if a.remote),
        )
        self._wake = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._terminating: set[tuple[str, str]] = set()
        self._backoff: dict[str, float] = {}
        self.ticks = 0
        self.last_tick_at = 0.0

    # ------------------------------------------------------------------ running

    def hint(self) -> None:
        """Wake the loop early (an API write, an agent report, a reclaim notice)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        pollers = [
            asyncio.create_task(self._poll_interruptions(name, a, stop), name=f"interruptions-{name}")
            for name, a in self.adapters.items()
            if isinstance(a, InterruptionSupport)
        ]
        try:
            while not stop.is_set():
                self._wake.clear()  # before the tick: a hint that arrives during it is kept
                try:
                    await self.tick()
                except Exception:  # a bug in one tick must not kill the daemon; log and go on
                    log.exception("reconcile tick failed")
                    metrics.TICK_ERRORS.inc()
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {waiter, stopper}, timeout=self.settings.engine.tick_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                stopper.cancel()
        finally:
            for task in pollers:
                task.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)
            await self.drain()

    async def drain(self, grace: float = 30.0) -> None:
        """Wait for terminations in flight (they stop billing; never abandon them lightly)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=grace)

    def healthy(self) -> bool:
        return time.time() - self.last_tick_at < max(60.0, 5 * self.settings.engine.tick_seconds)

    # ------------------------------------------------------------------ one tick

    async def tick(self) -> None:
        started = time.time()
        jobs = await self.store.run(self.store.active_jobs)
        attempts = await self.store.run(self.store.attempts_for, [j.id for j in jobs])
        observed, readable = await self._observe()
        now = time.time()
        to_launch: list[tuple[JobRow, JobSpec, bool]] = []
        retry: list[tuple[JobRow, JobSpec, AttemptRow]] = []
        for job in jobs:
            spec = JobSpec.model_validate_json(job.spec_json)
            rows = attempts.get(job.id, [])
            views = [attempt_view(r) for r in rows]
            decision = reconcile.decide(job_view(job, spec), views, observed, readable, now, self.cfg)
            launch = await self._apply(job, rows, decision, now)
            if launch is not None:
                to_launch.append((job, spec, launch))
            by_id = {r.id: r for r in rows}
            for action in decision.actions:
                if isinstance(action, reconcile.RetryLaunch):
                    retry.append((job, spec, by_id[action.attempt_id]))
        await self._reap(observed, readable)
        sem = asyncio.Semaphore(4)

        async def bounded(coro: Awaitable[None]) -> None:
            async with sem:
                await coro

        stats = await self.rate_stats() if to_launch else {}  # one history read per tick
        await asyncio.gather(
            *(bounded(self._relaunch_pending(j, s, a)) for j, s, a in retry),
            *(bounded(self._launch(j, s, early, stats)) for j, s, early in to_launch),
        )
        self.ticks += 1
        self.last_tick_at = time.time()
        metrics.TICK_SECONDS.observe(self.last_tick_at - started)

    async def _observe(self) -> tuple[dict[str, Instance], set[str]]:
        """One listing per provider, concurrently, each bounded by the provider timeout."""
        timeout = self.settings.engine.provider_timeout_seconds

        async def one(name: str, adapter: Adapter) -> tuple[str, list[Instance] | BaseException]:
            try:
                return name, await asyncio.wait_for(adapter.list_instances(), timeout)
            except (Exception, asyncio.TimeoutError) as exc:  # noqa: UP041
                return name, exc

        results = await asyncio.gather(*(one(n, a) for n, a in self.adapters.items()))
        observed: dict[str, Instance] = {}
        readable: set[str] = set()
        now = time.time()
        for name, result in results:
            h = self.health[name]
            if isinstance(result, BaseException):
                if h.ok:
                    h.since = now
                    log.warning("provider %s degraded: %s", name, _describe(result))
                h.ok, h.error = False, _describe(result)
                metrics.PROVIDER_ERRORS.labels(name, "list").inc()
                continue
            if not h.ok:
                log.info("provider %s recovered", name)
            h.ok, h.error, h.last_ok = True, "", now
            readable.add(name)
            for inst in result:
                if inst.name.startswith(f"{self.prefix}-"):
                    # a name seen twice (RunPod keeps stopped pods) prefers the live one
                    prev = observed.get(inst.name)
                    if prev is None or prev.state in (InstanceState.TERMINATED, InstanceState.EXITED):
                        observed[inst.name] = inst
        for name, h in self.health.items():
            metrics.PROVIDER_UP.labels(name).set(1 if h.ok else 0)
        return observed, readable

    # ------------------------------------------------------------------ applying decisions

    async def _apply(
        self, job: JobRow, rows: list[AttemptRow], d: reconcile.Decision, now: float
    ) -> bool | None:
        """Commit one job's transitions, then start its terminations. Returns None, or whether
        a launch is wanted early (True) or normally (False)."""
        by_id = {r.id: r for r in rows}
        job_fields: dict[str, object] = {}
        attempt_fields: dict[int, dict[str, object]] = {}
        events: list[tuple[int | None, str, str]] = []
        terminations: list[tuple[AttemptRow, str]] = []
        launch: bool | None = None
        for action in d.actions:
            if isinstance(action, reconcile.Adopt):
                a = by_id[action.attempt_id]
                attempt_fields.setdefault(a.id or 0, {}).update(
                    status=AttemptStatus.LAUNCHING.value, instance_id=action.instance_id,
                    launched_at=a.launched_at or now,
                )
                events.append((a.number, "adopted", f"found instance {action.instance_id} of attempt {a.number}"))
            elif isinstance(action, reconcile.MarkRunning):
                a = by_id[action.attempt_id]
                attempt_fields.setdefault(a.id or 0, {}).update(status=AttemptStatus.RUNNING.value, running_at=now)
                events.append((a.number, "running", f"attempt {a.number} running on {a.provider} {a.region}"))
            elif isinstance(action, reconcile.EndAttempt):
                a = by_id[action.attempt_id]
                cost = reconcile.attempt_cost(attempt_view(a), now)
                attempt_fields.setdefault(a.id or 0, {}).update(
                    status=AttemptStatus.ENDED.value, end_reason=action.reason.value, detail=action.detail[:1024],
                    exit_code=action.exit_code if action.exit_code is not None else a.exit_code,
                    exit_signal=action.exit_signal if action.exit_signal is not None else a.exit_signal,
                    ended_at=now, cost_usd=round(cost, 6),
                )
                events.append((a.number, action.reason.value, f"attempt {a.number} {action.reason.value}: {action.detail}"))
                metrics.ATTEMPTS_ENDED.labels(a.provider, action.reason.value).inc()
            elif isinstance(action, reconcile.Terminate):
                a = by_id[action.attempt_id]
                attempt_fields.setdefault(a.id or 0, {}).setdefault("stop_requested_at", a.stop_requested_at or now)
                terminations.append((a, action.instance_id))
            elif isinstance(action, reconcile.SetStatus):
                job_fields.update(status=action.status.value)
                if action.status == JobStatus.RECOVERING:
                    job_fields["message"] = "waiting for capacity"
            elif isinstance(action, reconcile.Finish):
                job_fields.update(status=action.status.value, end_reason=action.end_reason[:512],
                                  finished_at=now, message=action.end_reason[:1024], next_try_at=None)
                why = "" if action.end_reason == action.status.value else f": {action.end_reason}"
                events.append((None, action.status.value, f"job {action.status.value}{why}"))
                metrics.JOBS_FINISHED.labels(action.status.value).inc()
            elif isinstance(action, reconcile.Launch):
                launch = action.early
        if d.relaunches:
            job_fields["relaunches"] = job.relaunches + d.relaunches
        if d.retries:
            job_fields["retries"] = job.retries + d.retries
        if job_fields or attempt_fields or events:
            await self.store.run(self.store.apply, job.id, job_fields, attempt_fields, events)
        for a, instance_id in terminations:
            self._terminate_soon(a.provider, instance_id)
        return launch

    def _terminate_soon(self, provider: str, instance_id: str) -> None:
        key = (provider, instance_id)
        adapter = self.adapters.get(provider)
        if adapter is None or key in self._terminating:
            return
        self._terminating.add(key)

        async def go() -> None:
            try:
                await asyncio.wait_for(
                    adapter.terminate(instance_id),
                    self.settings.engine.provider_timeout_seconds + self.settings.engine.stop_grace_seconds,
                )
                log.info("terminated %s instance %s", provider, instance_id)
            except (Exception, asyncio.TimeoutError) as exc:  # noqa: UP041 - the reaper will retry
                metrics.PROVIDER_ERRORS.labels(provider, "terminate").inc()
                log.warning("terminate %s %s failed (will retry): %s", provider, instance_id, _describe(exc))
            finally:
                self._terminating.discard(key)
                self.hint()

        task = asyncio.create_task(go(), name=f"terminate-{provider}-{instance_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reap(self, observed: dict[str, Instance], readable: set[str]) -> None:
        """Terminate every instance with our prefix that no live attempt owns: leftovers of
        ended attempts whose termination failed, and true orphans (no attempt at all)."""
        live = {a.name for a in await self.store.run(self.store.live_attempts)}
        for name, inst in observed.items():
            if inst.provider not in readable or name in live or inst.state == InstanceState.TERMINATED:
                continue
            if (inst.provider, inst.instance_id) in self._terminating or parse_attempt_name(self.prefix, name) is None:
                continue
            row = await self.store.run(self.store.attempt_by_name, name)
            if row is not None and row.stop_requested_at is not None:
                log.info("stopping leftover %s instance %s of ended attempt %s", inst.provider, inst.instance_id, name)
            else:
                log.warning("reaping orphan %s instance %s (%s): no attempt owns it", inst.provider, inst.instance_id, name)
                metrics.ORPHANS_REAPED.labels(inst.provider).inc()
            self._terminate_soon(inst.provider, inst.instance_id)

    # ------------------------------------------------------------------ offers and launches

    async def offers(self, max_age: float | None = None) -> dict[str, list[Offer]]:
        """Every provider's offers, refreshed when older than `max_age` (default from config)."""
        max_age = self.settings.engine.offer_refresh_seconds if max_age is None else max_age
        now = time.time()

        async def one(name: str) -> None:
            cache = self.offer_cache[name]
            if now - cache.fetched_at < max_age:
                return
            try:
                cache.offers = await asyncio.wait_for(
                    self.adapters[name].offers(), self.settings.engine.provider_timeout_seconds
                )
                cache.fetched_at = time.time()
            except (Exception, asyncio.TimeoutError) as exc:  # noqa: UP041
                metrics.PROVIDER_ERRORS.labels(name, "offers").inc()
                log.warning("offers from %s unavailable: %s", name, _describe(exc))

        await asyncio.gather(*(one(n) for n in self.adapters))
        return {n: list(c.offers) for n, c in self.offer_cache.items()}

    async def rate_stats(self) -> dict[tuple[str, CapacityType], RateStats]:
        rows = await self.store.run(self.store.preemption_history)
        out: dict[tuple[str, CapacityType], RateStats] = {}
        for provider, capacity, n, hours in rows:
            with contextlib.suppress(ValueError):
                out[(provider, CapacityType(capacity))] = RateStats(n, hours)
        return out

    def _request(self, job: JobRow, spec: JobSpec, number: int, offer: Offer,
                 volume: ProviderVolume | None) -> LaunchRequest:
        name = attempt_name(self.prefix, job.id, number)
        env = dict(spec.env)
        env.update(
            GPUHOP_JOB_ID=job.id, GPUHOP_ATTEMPT=str(number), GPUHOP_ATTEMPT_NAME=name,
            GPUHOP_CALLBACK_URL=f"{self.settings.server.agent_base_url()}/v1/agent/report",
            GPUHOP_TOKEN=self.token_for(name), GPUHOP_HEARTBEAT=str(self.settings.engine.heartbeat_seconds),
        )
        return LaunchRequest(
            name=name, idempotency_key=f"{name}-{hashlib.sha1(offer.offer_id.encode()).hexdigest()[:10]}"[-64:],
            job_id=job.id, attempt=number, offer=offer, image=spec.image, command=list(spec.command), env=env,
            disk_gb=spec.resources.disk_gb, volume=volume,
            mount_path=spec.volume.mount_path if spec.volume else "/workspace",
            bid_price_per_hour=offer.price_per_hour if offer.capacity == CapacityType.SPOT else None,
        )

    async def _volume_for(self, spec: JobSpec, offer: Offer) -> ProviderVolume | None:
        if spec.volume is None:
            return None
        adapter = self.adapters[offer.provider]
        if not isinstance(adapter, VolumeSupport):
            raise PermanentError(f"{offer.provider} does not support volumes", provider=offer.provider)
        vol = await adapter.ensure_volume(spec.volume.name, spec.volume.size_gb, offer.region)
        await self.store.run(self.store.set_volume_location, spec.volume.name, vol.provider, vol.region, vol.volume_id)
        return vol

    async def _launch(self, job: JobRow, spec: JobSpec, early: bool,
                      stats: dict[tuple[str, CapacityType], RateStats]) -> None:
        """Place the job and start a new attempt, trying candidates best first."""
        now = time.time()
        if not early and job.next_try_at is not None and now < job.next_try_at:
            return
        offers_by_provider = await self.offers()
        offers = [o for name, lst in offers_by_provider.items() if self.health[name].ok for o in lst]
        location: VolumeLocation | None = None
        if spec.volume is not None:
            vol = await self.store.run(self.store.volume, spec.volume.name)
            location = VolumeLocation(vol.provider if vol else None, vol.region if vol else None)
        result = place(spec, offers, location, stats, self.placement)
        number = await self.store.run(self.store.next_attempt_number, job.id)
        tried: list[str] = []
        for cand in result.candidates[:8]:
            offer = cand.offer
            row = AttemptRow(
                job_id=job.id, number=number, name=attempt_name(self.prefix, job.id, number),
                provider=offer.provider, region=offer.region, offer_id=offer.offer_id,
                capacity=offer.capacity.value, gpu=offer.gpu, gpu_count=offer.gpu_count,
                price_per_hour=offer.price_per_hour, status=AttemptStatus.PENDING.value,
                placement_reason=cand.reason[:1024], created_at=time.time(),
            )
            try:
                volume = await asyncio.wait_for(self._volume_for(spec, offer), self.settings.engine.provider_timeout_seconds)
                if volume is not None:
                    row.volume_id = volume.volume_id
                row = await self.store.run(self.store.add_attempt, row)  # write-ahead
                req = self._request(job, spec, number, offer, volume)
                inst = await asyncio.wait_for(
                    self.adapters[offer.provider].launch(req), self.settings.engine.provider_timeout_seconds
                )
            except (NoCapacity, PermanentError) as exc:
                tried.append(f"{offer.provider}/{offer.region} {offer.gpu or 'cpu'}: {_describe(exc)}")
                if row.id is not None:
                    await self.store.run(self.store.delete_attempt, row.id)
                self.offer_cache[offer.provider].fetched_at = 0.0
                continue
            except (TimeoutError, RetryLater, AdapterError, OSError) as exc:
                # the launch may or may not have happened: keep the attempt pending; the next
                # observation adopts the instance, or the launch is retried under the same name
                await self.store.run(self.store.add_event, job.id, "launch_retry",
                                     f"launch of attempt {number} on {offer.provider} unconfirmed: {_describe(exc)}", number)
                return
            await self.store.run(
                self.store.apply, job.id,
                {"status": JobStatus.LAUNCHING.value if not early else job.status, "next_try_at": None,
                 "message": f"attempt {number} on {offer.provider} {offer.region}"},
                {row.id or 0: {"status": AttemptStatus.LAUNCHING.value, "instance_id": inst.instance_id,
                               "launched_at": time.time()}},
                [(number, "launched", f"attempt {number} launched{' ahead of a reclaim' if early else ''}: "
                  f"{cand.reason}")],
            )
            self._backoff.pop(job.id, None)
            self.offer_cache[offer.provider].fetched_at = 0.0
            metrics.LAUNCHES.labels(offer.provider, offer.capacity.value).inc()
            return
        # nothing could be launched: wait, with a growing pause
        delay = min(self.settings.engine.retry_backoff_max_seconds, self._backoff.get(job.id, 1.0) * 2)
        self._backoff[job.id] = delay
        why = "; ".join(tried) if tried else result.summary()
        await self.store.run(
            self.store.apply, job.id,
            {"next_try_at": time.time() + delay, "message": f"no capacity: {why}"[:1024]},
            {}, [(None, "no_capacity", f"nothing launched, next try in {delay:.0f} s: {why}")],
        )

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
        volume = None
        if spec.volume is not None and row.volume_id:
            vol = await self.store.run(self.store.volume, spec.volume.name)
            if vol is not None and vol.provider_volume_id:
                volume = ProviderVolume(row.provider, vol.provider_volume_id, vol.name, vol.region or row.region, vol.size_gb)
        req = self._request(job, spec, row.number, offer, volume)
        try:
            inst = await asyncio.wait_for(adapter.launch(req), self.settings.engine.provider_timeout_seconds)
        except (NoCapacity, PermanentError) as exc:
            await self.store.run(self.store.delete_attempt, row.id or 0)
            await self.store.run(self.store.add_event, job.id, "launch_failed",
                                 f"pending attempt {row.number} dropped: {_describe(exc)}", row.number)
            self.hint()
            return
        except (Exception, asyncio.TimeoutError) as exc:  # noqa: UP041
            log.info("relaunch of pending %s unconfirmed: %s", row.name, _describe(exc))
            return
        await self.store.run(self.store.update_attempt, row.id or 0, status=AttemptStatus.LAUNCHING.value,
                             instance_id=inst.instance_id, launched_at=row.launched_at or time.time())

    # ------------------------------------------------------------------ notices

    async def _poll_interruptions(self, name: str, adapter: InterruptionSupport, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                notices = await adapter.poll_interruptions(wait_seconds=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.PROVIDER_ERRORS.labels(name, "interruptions").inc()
                log.warning("interruption notices from %s unavailable: %s", name, _describe(exc))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 5)
                continue
            for notice in notices:
                await self.record_interruption(name, notice.instance_id, notice.deadline.timestamp())

    async def record_interruption(self, provider: str, instance_id: str, deadline: float) -> None:
        row = await self.store.run(self.store.attempt_by_instance, provider, instance_id)
        if row is None or row.status == AttemptStatus.ENDED.value or row.interruption_at is not None:
            return
        await self.store.run(self.store.update_attempt, row.id or 0, interruption_at=time.time())
        await self.store.run(
            self.store.add_event, row.job_id, "interruption",
            f"{provider} will reclaim instance {instance_id} at {time.strftime('%H:%M:%S', time.gmtime(deadline))}Z; "
            "launching the replacement now", row.number,
        )
        metrics.INTERRUPTIONS.labels(provider).inc()
        self.hint()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:300]

