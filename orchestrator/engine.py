"""The reconcile loop: observe every provider, decide each job with `reconcile.decide`, apply
the decisions write-ahead, and hand launches and terminations to bounded workers.

Money safety lives here and in `launching`. The tick itself only reads listings that arrived
(`observation`), reads the store, decides and commits: it never waits on a launch, a
termination or a slow provider, so it stays short whatever a provider does, and `healthy()`
means the loop is alive. Observations are keyed by instance id: two machines carrying one
attempt's name are a duplicate, and the extra one is stopped at once, recorded and costed. The
orphan reaper stops any machine with our prefix that no live attempt owns. Heartbeat silence is
counted only while this daemon was up.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters.base import Adapter, InterruptionSupport
from orchestrator import metrics, reconcile
from orchestrator.config import Settings
from orchestrator.launching import TerminateOrder, Workers
from orchestrator.models import (
    AttemptStatus,
    CapacityType,
    EndReason,
    Instance,
    InstanceState,
    JobSpec,
    JobStatus,
    Offer,
    parse_attempt_name,
)
from orchestrator.observation import Observer, ProviderHealth, Snapshot, describe, pick_primary
from orchestrator.placement import PlacementSettings, RateStats
from orchestrator.retention import prune_logs
from orchestrator.store import AttemptRow, JobRow, Store
from orchestrator.store.feed import ActiveState

log = logging.getLogger("gpuhop.engine")

HINT_GAP_SECONDS = 0.05  # a tick woken by a hint starts at least this long after the last one ended,
HINT_DUTY = 2.0  # and at least this many times the last tick's own length after it (see hint_gap)
YIELD_EVERY_SECONDS = 0.005  # the tick's per-job loop hands the event loop over at least this often

__all__ = ["Engine", "ProviderHealth", "attempt_view", "job_view", "placement_settings"]

PRUNE_EVERY_SECONDS = 3600.0
MOVE_SWEEP_SECONDS = 5.0
BILL_SWEEP_SECONDS = 60.0  # how often ended attempts still priced by estimate are looked for


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
        created_at=row.created_at, bill_started_at=row.bill_started_at,
        duplicate_cost_usd=row.duplicate_cost_usd,
    )


def job_view(row: JobRow, spec: JobSpec) -> reconcile.JobView:
    return reconcile.JobView(
        id=row.id, status=JobStatus(row.status), policy=spec.policy, cancel_requested=row.cancel_requested,
        relaunches=row.relaunches, retries=row.retries, next_try_at=row.next_try_at,
    )


@dataclass(frozen=True)
class _Quiet:
    """A job's inputs when deciding it last asked for nothing, and until when (by the clock
    alone) it would keep asking for nothing (reconcile.quiet_until). Rows are compared by
    identity: the store hands back the same row object while its row is unchanged (store.cache),
    so a quiet job is passed over without building its views: at 10,000 jobs most of a tick."""

    job: JobRow
    rows: tuple[AttemptRow, ...]
    live: tuple[tuple[str, str], ...]  # (name, provider) of each live attempt, in order
    seen: tuple[tuple[bool, tuple[object, ...] | None], ...]  # what the providers showed of them
    cfg: reconcile.Settings
    until: float

    def still(self, job: JobRow, rows: list[AttemptRow], readable: set[str],
              observed: dict[str, Instance], cfg: reconcile.Settings) -> bool:
        """Nothing `decide` reads of this job has changed since (the clock is checked apart)."""
        if job is not self.job or cfg is not self.cfg or len(rows) != len(self.rows):
            return False
        for a, b in zip(rows, self.rows, strict=True):
            if a is not b:
                return False
        for (name, provider), was in zip(self.live, self.seen, strict=True):
            if (provider in readable, reconcile.seen_as(observed.get(name))) != was:
                return False
        return True


APPLY_BATCH = 64  # jobs whose transitions a tick commits in one transaction (store.apply_many)


@dataclass
class _Planned:
    """One job's decision, planned: the rows to write, then what to start once they are written."""

    job: JobRow
    spec: JobSpec
    writes: tuple[str, dict[str, Any], dict[int, dict[str, Any]], list[tuple[int | None, str, str]]] | None
    terminations: list[TerminateOrder]
    launch: bool | None
    relaunch: list[AttemptRow]
    next_number: int  # the number a new attempt takes (the tick read every attempt of the job)


# How long one poll for interruption notices may wait (an SQS long poll on AWS: it answers as
# soon as a notice arrives). A stopping daemon waits for the poll in flight (no call outlives
# its caller), so this bounds `systemctl stop`: at 10 s a stop took 10 s half the time. Shorter
# costs requests: one per 3 s per region is ~29,000 a day, about $0.01 of SQS.
INTERRUPTION_POLL_SECONDS = 3


def hint_gap(period: float, took: float) -> float:
    """How long after a tick that took `took` s the next may start when woken early (a submit,
    an agent's report): long enough for a burst of hints (a thousand submits a second) to
    gather into one tick, short enough that each tick looks at a small slice of new jobs (a
    tick that looked at 1,000 new jobs at once held submits up by 100-400 ms, one every 0.2 s
    by 50-90 ms, issue 9), and never so short that ticks woken early take more than a third of
    the loop's time."""
    return min(max(HINT_GAP_SECONDS, HINT_DUTY * took), period)


def next_tick_in(period: float, took: float) -> float:
    """Ticks start every `period` seconds (a tick's own time is not added to the wait: a
    preemption waits half a period for the listing that shows it, not half a period plus half a
    tick), but at least a tenth of a period passes between two ticks, so a tick slower than
    its period never leaves the loop without a pause."""
    return max(period / 10, period - took)


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
        eng = settings.engine
        self.observer = Observer(adapters, self.prefix, offer_max_age=eng.offer_refresh_seconds,
                                 start_backoff_max=eng.provider_start_backoff_max_seconds)
        self.health: dict[str, ProviderHealth] = self.observer.health
        self.placement = placement_settings(settings)
        self.started_at = time.time()
        self.cfg = reconcile.Settings(
            launch_grace_seconds=eng.launch_grace_seconds,
            heartbeat_timeout_seconds=eng.heartbeat_timeout_seconds,
            remote_providers=frozenset(n for n, a in adapters.items() if a.remote),
            silence_since=self.started_at,
        )
        self.workers = Workers(settings, store, adapters, self.observer, self.placement, token_for, self.hint)
        self.observer.on_offers = self.workers.relocation.observe  # capacity gaps, for wait-or-move
        self._last_move_sweep = 0.0
        self._last_bill_sweep = 0.0
        self._wake = asyncio.Event()
        self._specs: dict[str, tuple[str, JobSpec]] = {}
        # views of the rows of the last tick, by id, with the row object they were built from
        self._job_views: dict[str, tuple[JobRow, reconcile.JobView]] = {}
        self._attempt_views: dict[int, tuple[AttemptRow, reconcile.AttemptView]] = {}
        self._quiet: dict[str, _Quiet] = {}  # jobs whose last decision asked for nothing, and until when
        # jobs to decide at the next tick whatever the change feed says: those whose last
        # decision asked for something, whose launch was in flight, or with a live machine
        self._watch: set[str] = set()
        self._wakeups: list[tuple[float, str]] = []  # (until, job id) of quiet jobs with no machine
        self._cfg_seen: reconcile.Settings | None = None
        self._duplicates_seen: set[str] = set()
        self._pending_events: list[tuple[str, int, str]] = []
        self._last_prune = 0.0
        self._prev_tick_at = 0.0
        self.ticks = 0
        self.last_tick_at = 0.0
        self.started_providers = False
        # whether this daemon reaps machines of ended jobs (cluster: the leader replica only, so a
        # duplicate's cost is not added twice); the cluster updates it
        self.leader = True

    # ------------------------------------------------------------------ running

    def hint(self) -> None:
        """Wake the loop early (an API write, an agent report, a reclaim notice)."""
        self._wake.set()

    def start_providers(self) -> None:
        """Start every provider in the background: one that fails is degraded and retried with
        backoff while the others run. Tests that build an Engine by hand call it, or `run` does."""
        if not self.started_providers:
            self.started_providers = True
            self.observer.start_providers()

    async def run(self, stop: asyncio.Event) -> None:
        self.start_providers()
        pollers = [
            asyncio.create_task(self._poll_interruptions(name, a, stop), name=f"interruptions-{name}")
            for name, a in self.adapters.items()
            if isinstance(a, InterruptionSupport)
        ]
        try:
            while not stop.is_set():
                self._wake.clear()  # before the tick: a hint that arrives during it is kept
                began, began_wall = time.monotonic(), time.time()
                try:
                    await self.tick()
                except Exception:  # a bug in one tick must not kill the daemon; log and go on
                    log.exception("reconcile tick failed")
                    metrics.TICK_ERRORS.inc()
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {waiter, stopper}, timeout=next_tick_in(self.settings.engine.tick_seconds, time.monotonic() - began),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                stopper.cancel()
                if self._wake.is_set() and not stop.is_set():
                    gap = hint_gap(self.settings.engine.tick_seconds, self.last_tick_at - began_wall)
                    await asyncio.sleep(max(0.0, self.last_tick_at + gap - time.time()))
        finally:
            for task in pollers:
                task.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)
            self.workers.stop_launching()
            await self.drain(grace=30.0)
            await self.observer.close()

    async def drain(self, grace: float | None = None) -> None:
        """Wait for the launches and terminations in flight."""
        await self.workers.drain(grace)

    def healthy(self) -> bool:
        """The loop is alive (ticks keep coming), whatever the providers do."""
        return time.time() - self.last_tick_at < max(30.0, 5 * self.settings.engine.tick_seconds)

    # ------------------------------------------------------------------ one tick

    def _spec(self, job: JobRow) -> JobSpec:
        cached = self._specs.get(job.id)
        if cached is not None and cached[0] == job.spec_json:
            return cached[1]
        spec = JobSpec.model_validate_json(job.spec_json)
        self._specs[job.id] = (job.spec_json, spec)
        return spec

    async def tick(self) -> None:
        """One pass: read fresh listings, then the store (after the listings, so an agent's
        report that arrived meanwhile is not overwritten by a stale snapshot), decide, commit,
        and hand work to the workers."""
        if not self.started_providers:
            self.start_providers()
            await self.observer.wait_started(self.settings.engine.listing_wait_seconds)
        started = time.time()
        eng = self.settings.engine
        snap = await self.observer.snapshot(self._prev_tick_at, min(eng.listing_wait_seconds, eng.tick_seconds))
        self._prev_tick_at = started
        read_at = time.monotonic()  # launches that end after this are not in what we read
        state = await self.store.run(self.store.active_changes)
        jobs, attempts = state.jobs, state.attempts
        now = time.time()
        live = {a.name: a for rows in attempts.values() for a in rows if a.status != AttemptStatus.ENDED.value}
        observed = self._primaries(snap, live)
        await asyncio.sleep(0)  # each pass over every job or machine is a few ms: let others in between
        while self._pending_events:
            job_id, number, message = self._pending_events.pop()
            await self.store.run(self.store.add_event, job_id, "duplicate", message, number)
        yield_at = time.perf_counter() + YIELD_EVERY_SECONDS
        batch: list[_Planned] = []
        job_views, attempt_views = self._job_views, self._attempt_views
        self._job_views, self._attempt_views = {}, {}  # this tick's only: nothing piles up
        quiet_jobs = self._quiet
        visits = self._visits(state, now)
        self._watch = set()
        for job_id in visits:
            if time.perf_counter() >= yield_at:  # let the API and agents in every few ms, not once per
                await asyncio.sleep(0)          # job: an idle pass of the loop costs a poll each time
                yield_at = time.perf_counter() + YIELD_EVERY_SECONDS
            job = jobs[job_id]
            rows = attempts.get(job_id, [])
            has_live = any(r.status != AttemptStatus.ENDED.value for r in rows)
            if has_live:
                self._watch.add(job_id)  # what the providers show of it can change any tick
            if not self.workers.fresh(job_id, read_at):
                if not self.workers.launching(job_id):
                    self._watch.add(job_id)  # its launch ended after the read: decided next tick
                continue  # in flight: decided once it ends (Workers.take_settled)
            quiet = quiet_jobs.get(job_id)
            if quiet is not None and now < quiet.until and quiet.still(job, rows, snap.readable, observed, self.cfg):
                if has_live:
                    continue  # nothing it reads has changed, nor has the clock reached a rule:
                self._sleep(job_id, quiet)  # deciding again would ask for nothing
                continue
            quiet_jobs.pop(job_id, None)
            spec = self._spec(job)
            # the store hands back the same row object while its row is unchanged (store.cache):
            # the same object means the same view, built once
            jv = job_views.get(job_id)
            if jv is None or jv[0] is not job:
                jv = (job, job_view(job, spec))
            self._job_views[job_id] = jv
            views = []
            for r in rows:
                av = attempt_views.get(r.id or 0)
                if av is None or av[0] is not r:
                    av = (r, attempt_view(r))
                self._attempt_views[r.id or 0] = av
                views.append(av[1])
            decision = reconcile.decide(jv[1], views, observed, snap.readable, now, self.cfg, snap.asked_at)
            quiet = None
            if not decision.actions and not decision.relaunches and not decision.retries:
                until = reconcile.quiet_until(jv[1], views, now, self.cfg, snap.asked_at)
                if until > now:
                    live_rows = tuple((a.name, a.provider) for a in views if a.live)
                    seen = tuple((provider in snap.readable, reconcile.seen_as(observed.get(name)))
                                 for name, provider in live_rows)
                    quiet = _Quiet(job, tuple(rows), live_rows, seen, self.cfg, until)
                    quiet_jobs[job_id] = quiet
            if quiet is None:
                self._watch.add(job_id)  # it asked for something: see it again next tick
            elif not has_live:
                self._sleep(job_id, quiet)
            batch.append(self._plan(job, spec, rows, decision, observed, now))
            if len(batch) >= APPLY_BATCH:
                await self._commit(batch)
                batch = []
        await self._commit(batch)
        if state.changed is None:  # a full read: whatever is kept of jobs no longer active goes
            for job_id in [k for k in self._specs if k not in jobs]:
                del self._specs[job_id]
            self.workers.forget(jobs.keys())
        else:  # else only what left since, not a pass over every job each tick
            for job_id in state.removed:
                self._specs.pop(job_id, None)
            self.workers.forget_jobs(state.removed)
        for job_id in state.removed:
            self._quiet.pop(job_id, None)
        await asyncio.sleep(0)
        await self._record_bill_starts(observed, live)
        await asyncio.sleep(0)
        await self._reap(snap, live)
        if now - self._last_move_sweep >= MOVE_SWEEP_SECONDS:  # moves a crash left, retired volumes
            self._last_move_sweep = now
            self.workers.sweep_moves_soon(self._specs.__contains__, self.leader)
        if self.leader and now - self._last_bill_sweep >= BILL_SWEEP_SECONDS:  # bills a crash left unread
            self._last_bill_sweep = now
            self.workers.finish_bills_soon(now)
        await self._prune(now, set(live))
        self.ticks += 1
        self.last_tick_at = time.time()
        metrics.TICK_SECONDS.observe(self.last_tick_at - started)

    def _visits(self, state: ActiveState, now: float) -> list[str]:
        """The jobs this tick decides: all of them after a full read (or a change of settings),
        else those the change feed names, those watched (see `_watch`) and quiet ones whose
        time has come. A quiet job with no machine depends on nothing but its rows and the
        clock, so it is not looked at again until one of them says so: at 10,000 jobs waiting
        for capacity, passing over each of them every tick was most of an idle tick."""
        jobs = state.jobs
        if state.changed is None or self._cfg_seen is not self.cfg:
            self._cfg_seen = self.cfg
            self._wakeups = []
            return list(jobs)
        wanted = state.changed | self._watch | {j for j in self.workers.take_settled() if j in jobs}
        while self._wakeups and self._wakeups[0][0] <= now:
            _, job_id = heapq.heappop(self._wakeups)
            wanted.add(job_id)
        if len(self._wakeups) > 4 * len(jobs) + 1024:  # entries of jobs decided again since
            self._wakeups = [(q.until, j) for j, q in self._quiet.items() if q.until != float("inf") and not q.live]
            heapq.heapify(self._wakeups)
        if len(wanted) * 4 > len(jobs):
            return [j for j in jobs if j in wanted]  # the store's order: oldest first
        return sorted((j for j in wanted if j in jobs), key=lambda j: (jobs[j].created_at, j))

    def _sleep(self, job_id: str, quiet: _Quiet) -> None:
        """A quiet job with no machine: decided again when its rows change or at `quiet.until`."""
        if quiet.until != float("inf"):
            heapq.heappush(self._wakeups, (quiet.until, job_id))

    def _primaries(self, snap: Snapshot, live: dict[str, AttemptRow]) -> dict[str, Instance]:
        """The instance each attempt name stands for; every other live instance with a live
        attempt's name is a duplicate, stopped at once and its bill added to that attempt."""
        observed: dict[str, Instance] = {}
        for name, instances in snap.by_name.items():
            attempt = live.get(name)
            known = attempt.instance_id if attempt is not None else None
            if len(instances) == 1 and known in (None, instances[0].instance_id):
                observed[name] = instances[0]  # the usual case: one machine per name, no duplicate
                continue
            primary, extras = pick_primary(instances, known)
            if primary is not None:
                observed[name] = primary
            if attempt is None:
                continue  # no live attempt: the reaper deals with every one of them
            for extra in extras:
                if self.workers.stopping_or_stopped(extra.provider, extra.instance_id):
                    continue
                key = f"{extra.provider}/{extra.instance_id}"
                if key not in self._duplicates_seen:
                    self._duplicates_seen.add(key)
                    log.warning("duplicate %s instance %s carries attempt %s: stopping it",
                                extra.provider, extra.instance_id, name)
                    metrics.DUPLICATES.labels(extra.provider).inc()
                    self._pending_events.append((
                        attempt.job_id, attempt.number,
                        f"a second {extra.provider} machine {extra.instance_id} carried attempt "
                        f"{attempt.number}'s name; stopped it (its cost is added to the attempt)",
                    ))
                self.workers.terminate_soon(TerminateOrder(
                    extra.provider, extra.instance_id, attempt_id=attempt.id, duplicate=True,
                    price_per_hour=extra.price_per_hour or attempt.price_per_hour,
                    started_at=extra.bill.started_at if extra.bill else None, last_bill=extra.bill,
                ))
        return observed

    async def _record_bill_starts(self, observed: dict[str, Instance], live: dict[str, AttemptRow]) -> None:
        """Remember when the provider started billing each live attempt (once)."""
        for name, attempt in live.items():
            if attempt.bill_started_at is not None:
                continue  # known already (most of them, most ticks)
            inst = observed.get(name)
            if (inst is not None and inst.bill is not None and attempt.bill_started_at is None
                    and attempt.instance_id == inst.instance_id):
                await self.store.run(self.store.update_attempt, attempt.id or 0,
                                     bill_started_at=inst.bill.started_at)

    # ------------------------------------------------------------------ applying decisions

    async def _commit(self, batch: list[_Planned]) -> None:
        """Write the planned transitions (one transaction), then act on them: terminations,
        launches and re-issued launches start only once what led to them is committed."""
        writes = [p.writes for p in batch if p.writes is not None]
        refused = await self.store.run(self.store.apply_many, writes) if writes else set()
        for p in batch:
            if p.job.id in refused:  # claimed by another replica (or our lease lapsed): theirs now
                log.warning("job %s: not applied: this replica no longer owns it", p.job.id)
                continue
            for order in p.terminations:
                self.workers.terminate_soon(order)
            if p.launch is not None and self.observer.settled():
                self.workers.launch_soon(p.job, p.spec, p.launch, p.next_number)
            for row in p.relaunch:
                self.workers.relaunch_soon(p.job, p.spec, row)

    def _plan(
        self, job: JobRow, spec: JobSpec, rows: list[AttemptRow], d: reconcile.Decision,
        observed: dict[str, Instance], now: float,
    ) -> _Planned:
        """One job's decision as the rows to write and what to do once they are written."""
        by_id = {r.id: r for r in rows}
        job_fields: dict[str, object] = {}
        attempt_fields: dict[int, dict[str, object]] = {}
        events: list[tuple[int | None, str, str]] = []
        terminations: list[TerminateOrder] = []
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
                cost = reconcile.attempt_cost(attempt_view(a), now) - a.duplicate_cost_usd
                attempt_fields.setdefault(a.id or 0, {}).update(
                    status=AttemptStatus.ENDED.value, end_reason=action.reason.value, detail=action.detail[:1024],
                    exit_code=action.exit_code if action.exit_code is not None else a.exit_code,
                    exit_signal=action.exit_signal if action.exit_signal is not None else a.exit_signal,
                    ended_at=now, cost_usd=round(cost, 6),
                )
                events.append((a.number, action.reason.value, f"attempt {a.number} {action.reason.value}: {action.detail}"))
                metrics.ATTEMPTS_ENDED.labels(a.provider, action.reason.value).inc()
                if action.reason == EndReason.NO_CAPACITY and a.offer_id:
                    self.workers.avoid(job.id, f"{a.provider}:{a.offer_id}")
            elif isinstance(action, reconcile.Terminate):
                a = by_id[action.attempt_id]
                attempt_fields.setdefault(a.id or 0, {}).setdefault("stop_requested_at", a.stop_requested_at or now)
                seen = observed.get(a.name)
                bill = seen.bill if seen is not None and seen.instance_id == action.instance_id else None
                terminations.append(TerminateOrder(
                    a.provider, action.instance_id, attempt_id=a.id, price_per_hour=a.price_per_hour,
                    started_at=a.bill_started_at or a.launched_at, last_bill=bill,
                ))
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
            elif isinstance(action, reconcile.SuspendProvider):
                seconds = self.settings.engine.account_suspend_seconds
                if self.observer.suspend(action.provider, action.reason, seconds):
                    events.append((None, "provider_suspended",
                                   f"{action.provider} stopped a machine for the account ({action.reason}); "
                                   f"no launches there for {seconds:.0f} s (engine.account_suspend_seconds)"))
        if d.relaunches:
            job_fields["relaunches"] = job.relaunches + d.relaunches
        if d.retries:
            job_fields["retries"] = job.retries + d.retries
        writes = (job.id, job_fields, attempt_fields, events) if job_fields or attempt_fields or events else None
        relaunch = [by_id[a.attempt_id] for a in d.actions if isinstance(a, reconcile.RetryLaunch)]
        return _Planned(job, spec, writes, terminations, launch, relaunch,
                        max((r.number for r in rows), default=0) + 1)

    async def _reap(self, snap: Snapshot, live: dict[str, AttemptRow]) -> None:
        """Terminate every instance with our prefix that no live attempt owns: leftovers of
        ended attempts whose termination failed, and true orphans (no attempt at all)."""
        mine = self._specs  # this tick's own unfinished jobs

        def unknown(name: str) -> bool:  # ours by prefix, but of no live attempt of this replica's
            parsed = parse_attempt_name(self.prefix, name)
            return parsed is not None and (self.leader or parsed[0] in mine)

        candidates = [
            inst for name, instances in snap.by_name.items() if name not in live and unknown(name)
            for inst in instances
            if inst.provider in snap.readable and inst.state != InstanceState.TERMINATED
            and not self.workers.stopping_or_stopped(inst.provider, inst.instance_id)
        ]
        if candidates and self.leader:
            # other replicas' unfinished jobs are theirs to look after (read only when needed:
            # with several replicas most names here are theirs)
            foreign = await self.store.run(self.store.foreign_active)
            candidates = [i for i in candidates if (parse_attempt_name(self.prefix, i.name) or ("",))[0] not in foreign]
        if not candidates:
            return
        # an attempt made since the listing may own one: look again before stopping anything
        live_now = {a.name for a in await self.store.run(self.store.live_attempts)}
        for inst in candidates:
            if inst.name in live_now:
                continue
            row = await self.store.run(self.store.attempt_by_name, inst.name)
            order = TerminateOrder(inst.provider, inst.instance_id, last_bill=inst.bill)
            if row is not None and row.instance_id == inst.instance_id:
                log.info("stopping leftover %s instance %s of ended attempt %s", inst.provider, inst.instance_id,
                         inst.name)
                order = TerminateOrder(inst.provider, inst.instance_id, attempt_id=row.id,
                                       price_per_hour=row.price_per_hour,
                                       started_at=row.bill_started_at or row.launched_at, last_bill=inst.bill)
            elif row is not None:
                log.warning("stopping extra %s instance %s carrying ended attempt %s", inst.provider,
                            inst.instance_id, inst.name)
                order = TerminateOrder(inst.provider, inst.instance_id, attempt_id=row.id, duplicate=True,
                                       price_per_hour=inst.price_per_hour or row.price_per_hour,
                                       started_at=inst.bill.started_at if inst.bill else None, last_bill=inst.bill)
            else:
                log.warning("reaping orphan %s instance %s (%s): no attempt owns it", inst.provider,
                            inst.instance_id, inst.name)
                metrics.ORPHANS_REAPED.labels(inst.provider).inc()
            self.workers.terminate_soon(order)

    async def _prune(self, now: float, live_names: set[str]) -> None:
        if now - self._last_prune < PRUNE_EVERY_SECONDS:
            return
        self._last_prune = now
        prune = getattr(self.store, "prune", None)
        if prune is not None:
            try:
                await self.store.run(prune, now)
            except Exception as exc:  # retention is housekeeping: never fail a tick for it
                log.warning("pruning old events failed: %s", describe(exc))
        try:
            await self.store.run(self.store.prune_capacity_gaps, now - self.settings.moving.history_days * 86400)
        except Exception as exc:
            log.warning("pruning old capacity gaps failed: %s", describe(exc))
        try:
            await self.store.run(self.store.prune_workdirs, now - self.settings.workdirs.keep_days * 86400)
        except Exception as exc:
            log.warning("pruning old workdir archives failed: %s", describe(exc))
        cutoff = now - self.settings.server.log_retention_days * 86400
        try:
            removed = await asyncio.to_thread(prune_logs, self.settings.state_dir / "logs", live_names, cutoff)
        except Exception as exc:
            log.warning("pruning old output files failed: %s", describe(exc))
            return
        if removed:
            log.info("deleted %d output file(s) of attempts ended over %g days ago", removed,
                     self.settings.server.log_retention_days)

    def report_bases(self) -> list[str]:
        """Where agents reach the daemon: this replica first, then the other live ones."""
        return [self.settings.server.agent_base_url(), *self.workers.peer_urls]

    # ------------------------------------------------------------------ offers

    async def offers(self, max_age: float | None = None) -> dict[str, list[Offer]]:
        """Every provider's offers, refreshed when older than `max_age` (default from config)."""
        return await self.observer.offers(max_age, wait=self.settings.engine.provider_timeout_seconds)

    async def rate_stats(self) -> dict[tuple[str, CapacityType], RateStats]:
        return await self.workers.rate_stats()

    # ------------------------------------------------------------------ notices

    async def _poll_interruptions(self, name: str, adapter: InterruptionSupport, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.observer.started(name):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1)
                continue
            try:
                notices = await adapter.poll_interruptions(wait_seconds=INTERRUPTION_POLL_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.PROVIDER_ERRORS.labels(name, "interruptions").inc()
                log.warning("interruption notices from %s unavailable: %s", name, describe(exc))
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



