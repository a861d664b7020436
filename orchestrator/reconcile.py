"""Pure decisions: given one job, its attempts, what the providers show right now and the time,
say what should happen. No I/O, no clock, no store: the engine gathers the inputs, calls
`decide`, and carries the actions out. That is what lets every rule below be tested as a table.

The rules, in order of precedence for each live attempt:

1. A provider we could not read this tick tells us nothing: wait.
2. A pending attempt (recorded, launch unconfirmed) that shows up is adopted; one that does not
   is launched again under the same name (launches are idempotent by name).
3. The provider's word that it took the machine (PREEMPTED) makes the attempt `preempted`.
4. The job's exit, from the agent's report or the listing: 0 is `succeeded`; non-zero is
   `failed`; killed by a signal gpuhop did not send, or exited after a SIGTERM gpuhop did not
   send, is `lost` (a preemption notice if the provider's listing says so).
5. An instance gone without an exit code, after the launch grace, is `lost`; so is a remote
   agent silent past the heartbeat timeout. Silence is counted only while this daemon was up
   (`Settings.silence_since`): an agent that could not report while the daemon was down is not
   lost, and after a restart of any length every agent gets a full timeout to report again.
   A listing taken before an attempt was launched says nothing about it (`observed_at`).
6. A provider's fault that is not the job's doing (`Instance.fault`, unless the agent reported
   the exit first): an image that cannot run fails the job at once, whatever its retry
   policy (another attempt would fail the same way); an account stop (insufficient balance)
   suspends that provider for launches and re-places the job elsewhere; a launch that
   ended before it ran for want of capacity is re-placed. Neither counts as a relaunch.
7. An attempt under a reclaim notice is handed over (ended `preempted`, its machine stopped so
   the job checkpoints and the volume is free) as soon as its early replacement is up.
Then the job: `launching` once a provider confirmed a machine (a launch still in flight leaves
it `queued` or `recovering`); cancelled when asked; out of budget when its cost reaches `max_cost_usd`; a new
attempt when none is live (within `max_relaunches` / `max_retries_on_error`), or early when a
reclaim notice arrives.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.models import (
    AttemptStatus,
    EndReason,
    Instance,
    InstanceFault,
    InstanceState,
    JobStatus,
    Policy,
)


@dataclass(frozen=True)
class AttemptView:
    id: int
    number: int
    name: str
    provider: str
    status: AttemptStatus
    price_per_hour: float
    instance_id: str | None = None
    launched_at: float | None = None
    running_at: float | None = None
    ended_at: float | None = None
    end_reason: EndReason | None = None
    cost_usd: float = 0.0
    agent_state: str = ""  # "", "started", "exited"
    exit_code: int | None = None
    exit_signal: int | None = None
    sigterm_received: bool = False
    last_heartbeat_at: float | None = None
    interruption_at: float | None = None
    stop_requested_at: float | None = None
    created_at: float | None = None
    bill_started_at: float | None = None  # the provider's own start of billing, when known
    duplicate_cost_usd: float = 0.0  # paid for extra machines that carried this attempt's name

    @property
    def live(self) -> bool:
        return self.status != AttemptStatus.ENDED


@dataclass(frozen=True)
class JobView:
    id: str
    status: JobStatus
    policy: Policy
    cancel_requested: bool = False
    relaunches: int = 0
    retries: int = 0
    next_try_at: float | None = None


@dataclass(frozen=True)
class Settings:
    launch_grace_seconds: float = 60.0
    heartbeat_timeout_seconds: float = 180.0
    # providers whose machines report through the agent (the daemon cannot see their processes)
    remote_providers: frozenset[str] = frozenset()
    # heartbeat silence is counted from here at the earliest (when this daemon process started)
    silence_since: float = 0.0


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Adopt:
    """The pending attempt's instance exists: record its id, it is launching."""

    attempt_id: int
    instance_id: str


@dataclass(frozen=True)
class RetryLaunch:
    """Launch the pending attempt again under its own name (nothing was seen of it)."""

    attempt_id: int


@dataclass(frozen=True)
class MarkRunning:
    attempt_id: int


@dataclass(frozen=True)
class EndAttempt:
    attempt_id: int
    reason: EndReason
    detail: str
    exit_code: int | None = None
    exit_signal: int | None = None


@dataclass(frozen=True)
class Terminate:
    """Stop the instance (billing stops). Idempotent."""

    attempt_id: int
    instance_id: str


@dataclass(frozen=True)
class Launch:
    """Place and start a new attempt. `early` = a replacement ahead of a reclaim notice."""

    early: bool = False


@dataclass(frozen=True)
class SetStatus:
    status: JobStatus
    message: str = ""


@dataclass(frozen=True)
class Finish:
    status: JobStatus
    end_reason: str


@dataclass(frozen=True)
class SuspendProvider:
    """The provider refuses to run anything for this account (insufficient balance): stop
    placing jobs there for a while instead of relaunching into the same refusal."""

    provider: str
    reason: str


Action = Adopt | RetryLaunch | MarkRunning | EndAttempt | Terminate | Launch | SetStatus | Finish | SuspendProvider


@dataclass
class Decision:
    actions: list[Action] = field(default_factory=list)
    relaunches: int = 0  # increments to apply to the job's counters
    retries: int = 0
    fatal: str = ""  # the job cannot succeed anywhere (an image that cannot run): why

    def add(self, action: Action) -> None:
        self.actions.append(action)


def attempt_cost(a: AttemptView, now: float) -> float:
    """What an attempt cost (ended: the provider's bill once the termination is confirmed) or
    has cost so far (live: price x seconds since billing began), duplicates included."""
    if not a.live:
        return a.cost_usd + a.duplicate_cost_usd
    start = a.bill_started_at if a.bill_started_at is not None else a.launched_at
    if start is None:
        return a.duplicate_cost_usd
    return max(0.0, now - start) * a.price_per_hour / 3600.0 + a.duplicate_cost_usd


def job_cost(attempts: list[AttemptView], now: float) -> float:
    return sum(attempt_cost(a, now) for a in attempts)


def _exit_outcome(a: AttemptView, inst: Instance | None) -> tuple[EndReason, str, int | None, int | None] | None:
    """What the job's exit means, when it is known (agent report first, then the listing)."""
    if a.agent_state == "exited":
        code, sig, sigterm = a.exit_code, a.exit_signal, a.sigterm_received
    elif inst is not None and inst.state == InstanceState.EXITED and (
        inst.exit_code is not None or inst.exit_signal is not None
    ):
        # an adapter that read the agent's exit line (EC2 console) passes its SIGTERM flag on
        code, sig, sigterm = inst.exit_code, inst.exit_signal, inst.extra.get("exit_sigterm") == "true"
        if inst.stopped_by_us:
            return EndReason.CANCELLED, "stopped by gpuhop", code, sig
    else:
        return None
    if sigterm and sig in (None, signal.SIGTERM, signal.SIGKILL):
        # the provider's SIGTERM (forwarded by the agent) and, past its notice, SIGKILL: the job
        # ended because the machine was being taken, however it ended
        how = f"killed by signal {sig}" if sig is not None else f"exited with code {code}"
        return EndReason.PREEMPTED, f"{how} after the provider's SIGTERM", code, sig
    if sig is not None:
        return EndReason.LOST, f"killed by signal {sig} that gpuhop did not send", code, sig
    if code == 0:
        return EndReason.SUCCEEDED, "exit code 0", code, sig
    return EndReason.FAILED, f"exit code {code}", code, sig


def _newer_than_listing(a: AttemptView, observed_at: dict[str, float] | None) -> bool:
    if observed_at is None or a.provider not in observed_at:
        return False
    seen = observed_at[a.provider]
    return any(t is not None and t > seen for t in (a.created_at, a.launched_at))


def _judge_attempt(a: AttemptView, inst: Instance | None, now: float, cfg: Settings, d: Decision) -> EndReason | None:
    """Decide one live attempt whose provider was read this tick. Returns its end reason if it
    ended now."""
    if a.status == AttemptStatus.PENDING:
        if inst is None or inst.state == InstanceState.TERMINATED:
            d.add(RetryLaunch(a.id))
            return None
        d.add(Adopt(a.id, inst.instance_id))

    instance_id = a.instance_id or (inst.instance_id if inst else None)

    def end(reason: EndReason, detail: str, code: int | None = None, sig: int | None = None) -> EndReason:
        d.add(EndAttempt(a.id, reason, detail, code, sig))
        if instance_id:
            d.add(Terminate(a.id, instance_id))
        return reason

    if inst is not None and inst.state == InstanceState.PREEMPTED and a.agent_state != "exited":
        # (once the agent reported how the job ended, that decides: a job that finished before
        # its machine was taken finished; one that saw the provider's SIGTERM was preempted)
        return end(EndReason.PREEMPTED, inst.reason or "reclaimed by the provider")
    if inst is not None and inst.fault is not None and a.agent_state != "exited":
        return _fault(a, inst, inst.fault, d, end)
    outcome = _exit_outcome(a, inst)
    if outcome is not None:
        reason, detail, code, sig = outcome
        if reason == EndReason.LOST and inst is not None and inst.reason and inst.state == InstanceState.PREEMPTED:
            reason = EndReason.PREEMPTED
        return end(reason, detail, code, sig)
    if inst is None or inst.state == InstanceState.TERMINATED:
        since = a.launched_at if a.launched_at is not None else now
        if now - since < cfg.launch_grace_seconds and inst is None:
            return None  # listings can lag a fresh launch
        why = inst.reason if inst is not None and inst.reason else "instance vanished without an exit code"
        return end(EndReason.LOST, why)
    if inst.state == InstanceState.EXITED:
        # the process ended but nobody knows how: give the agent's report a grace period
        if a.provider in cfg.remote_providers and now - (a.launched_at or now) < cfg.launch_grace_seconds:
            return None
        return end(EndReason.LOST, inst.reason or "exited without reporting an exit code")
    if inst.state == InstanceState.RUNNING and a.status != AttemptStatus.RUNNING:
        d.add(MarkRunning(a.id))
    if a.provider in cfg.remote_providers and a.status == AttemptStatus.RUNNING:
        last = max(a.last_heartbeat_at or a.running_at or a.launched_at or now, cfg.silence_since)
        if now - last > cfg.heartbeat_timeout_seconds:
            return end(EndReason.LOST, f"no report from the agent for {int(now - last)} s")
    return None


def _fault(a: AttemptView, inst: Instance, fault: InstanceFault, d: Decision,
           end: Callable[[EndReason, str], EndReason]) -> EndReason:
    words = inst.reason or fault.value
    if fault == InstanceFault.IMAGE:
        d.fatal = f"{a.provider} cannot run the job's image: {words}"
        return end(EndReason.FAILED, d.fatal)
    if fault == InstanceFault.ACCOUNT:
        d.add(SuspendProvider(a.provider, words))
        return end(EndReason.NO_CAPACITY, f"{a.provider} stopped it for the account: {words}")
    return end(EndReason.NO_CAPACITY, f"the launch on {a.provider} failed before it ran: {words}")


def decide(
    job: JobView,
    attempts: list[AttemptView],
    observed: dict[str, Instance],
    readable: set[str],
    now: float,
    cfg: Settings,
    observed_at: dict[str, float] | None = None,
) -> Decision:
    """Everything that should happen to `job` now. `observed` maps attempt names to the
    instances seen this tick; `readable` is the providers whose listing succeeded, and
    `observed_at` when each of those listings was asked for (an attempt recorded or launched
    after that is not judged by it)."""
    d = Decision()
    live = [a for a in attempts if a.live]

    if job.cancel_requested:
        for a in live:
            d.add(EndAttempt(a.id, EndReason.CANCELLED, "cancelled by the user"))
            instance_id = a.instance_id or (observed[a.name].instance_id if a.name in observed else None)
            if instance_id:
                d.add(Terminate(a.id, instance_id))
        d.add(Finish(JobStatus.CANCELLED, "cancelled by the user"))
        return d

    ended_now: dict[int, EndReason] = {}
    still_live: list[AttemptView] = []
    for a in live:
        if a.provider not in readable or _newer_than_listing(a, observed_at):
            still_live.append(a)
            continue
        reason = _judge_attempt(a, observed.get(a.name), now, cfg, d)
        if reason is None:
            still_live.append(a)
        else:
            ended_now[a.id] = reason

    # a replacement started ahead of a reclaim is up: stop the warned machine now, so that its
    # job checkpoints and its volume moves while the provider's notice still runs
    warned = [a for a in still_live if a.interruption_at is not None]
    newer = [a for a in still_live if a.interruption_at is None]
    if warned and newer:
        repl = max(newer, key=lambda a: a.number)
        seen = observed.get(repl.name)
        if repl.status == AttemptStatus.RUNNING or (seen is not None and seen.state == InstanceState.RUNNING):
            for a in warned:
                d.add(EndAttempt(a.id, EndReason.PREEMPTED,
                                 f"reclaim notice; handed over to attempt {repl.number} before the reclaim"))
                if a.instance_id:
                    d.add(Terminate(a.id, a.instance_id))
                ended_now[a.id] = EndReason.PREEMPTED
            still_live = [a for a in still_live if a.interruption_at is None]

    spent = job_cost(attempts, now)
    budget = job.policy.max_cost_usd

    if EndReason.SUCCEEDED in ended_now.values():
        for a in still_live:  # an early replacement that is no longer needed
            d.add(EndAttempt(a.id, EndReason.CANCELLED, "another attempt finished the job"))
            if a.instance_id:
                d.add(Terminate(a.id, a.instance_id))
        d.add(Finish(JobStatus.SUCCEEDED, "succeeded"))
        return d

    if d.fatal and not still_live:
        d.add(Finish(JobStatus.FAILED, d.fatal))
        return d

    if budget is not None and spent >= budget:
        for a in still_live:
            d.add(EndAttempt(a.id, EndReason.BUDGET, f"job cost ${spent:.2f} reached max_cost_usd ${budget:.2f}"))
            if a.instance_id:
                d.add(Terminate(a.id, a.instance_id))
        d.add(Finish(JobStatus.FAILED, f"budget: spent ${spent:.2f} of max_cost_usd ${budget:.2f}"))
        return d

    relaunches = job.relaunches + sum(1 for r in ended_now.values() if r in (EndReason.PREEMPTED, EndReason.LOST))
    retries = job.retries + sum(1 for r in ended_now.values() if r == EndReason.FAILED)
    d.relaunches = relaunches - job.relaunches
    d.retries = retries - job.retries

    if still_live:
        # a reclaim notice on the only live attempt: start its replacement now
        if len(still_live) == 1 and still_live[0].interruption_at is not None and relaunches < job.policy.max_relaunches:
            d.add(Launch(early=True))
        running = any(a.status == AttemptStatus.RUNNING for a in still_live) or any(
            isinstance(x, MarkRunning) for x in d.actions
        )
        confirmed = any(a.status != AttemptStatus.PENDING for a in still_live) or any(
            isinstance(x, Adopt) for x in d.actions
        )
        if running:
            status = JobStatus.RUNNING
        elif confirmed:
            status = JobStatus.LAUNCHING
        elif job.status in (JobStatus.QUEUED, JobStatus.RECOVERING, JobStatus.LAUNCHING):
            status = job.status  # a launch in flight is not a launch yet: the job still waits
        else:
            status = JobStatus.RECOVERING if any(not a.live for a in attempts) else JobStatus.QUEUED
        if status != job.status:
            d.add(SetStatus(status))
        return d

    # nothing live: finish, or place a new attempt
    ended_rows = [a for a in attempts if a.id in ended_now]
    last = max(ended_rows, key=lambda a: a.number) if ended_rows else None
    last_reason = ended_now[last.id] if last is not None else None
    if last is not None and last_reason == EndReason.FAILED and retries > job.policy.max_retries_on_error:
        detail = next((x.detail for x in d.actions if isinstance(x, EndAttempt) and x.attempt_id == last.id), "")
        d.add(Finish(JobStatus.FAILED, detail or "failed"))
        return d
    if relaunches > job.policy.max_relaunches:
        d.add(Finish(JobStatus.FAILED, f"gave up after {job.relaunches} relaunches (max_relaunches = {job.policy.max_relaunches}); last attempt {last_reason or 'lost'}"))
        return d
    if job.next_try_at is not None and now < job.next_try_at and not ended_now:
        return d  # waiting for capacity; the engine's backoff decides when to look again
    has_history = any(not a.live for a in attempts) or bool(ended_now)
    waiting = JobStatus.RECOVERING if has_history else JobStatus.QUEUED
    if waiting != job.status:
        d.add(SetStatus(waiting))
    d.add(Launch())
    return d


# ----------------------------------------------------------------------------- quiet jobs


def seen_as(inst: Instance | None) -> tuple[object, ...] | None:
    """Everything `decide` reads of an observed instance, as a value to compare between ticks."""
    if inst is None:
        return None
    return (inst.instance_id, inst.state, inst.reason, inst.fault, inst.exit_code, inst.exit_signal,
            inst.stopped_by_us, inst.extra.get("exit_sigterm"))


def quiet_until(
    job: JobView,
    attempts: list[AttemptView],
    now: float,
    cfg: Settings,
    observed_at: dict[str, float] | None = None,
) -> float:
    """For a job whose `decide(...)` at `now` asked for nothing: until when the same inputs
    (job, attempts, instances as `seen_as` shows them, providers' readability) keep asking for
    nothing. Only the clock moves the rules then: the launch grace, the heartbeat timeout, the
    budget (a live attempt's cost grows), the placement backoff. Each of them flips once and
    for good (a grace that ended stays ended, spending only grows), so one that has already
    flipped without asking for anything never will: only the ones still ahead count. Returns
    the earliest of those (inf: none); `now` when an attempt is newer than the listing (the
    next listing judges it, so the job must be decided again). Conservative: it may name a
    moment that changes nothing, never a later one than the first that could."""
    ahead: list[float] = []
    live = [a for a in attempts if a.live]
    for a in live:
        if _newer_than_listing(a, observed_at):
            return now
        if a.launched_at is not None:
            ahead.append(a.launched_at + cfg.launch_grace_seconds)
        if a.provider in cfg.remote_providers and a.status == AttemptStatus.RUNNING:
            heard = a.last_heartbeat_at or a.running_at or a.launched_at
            if heard is not None:
                ahead.append(max(heard, cfg.silence_since) + cfg.heartbeat_timeout_seconds)
    budget = job.policy.max_cost_usd
    if budget is not None:
        rate = sum(a.price_per_hour / 3600.0 for a in live
                   if (a.bill_started_at if a.bill_started_at is not None else a.launched_at) is not None)
        if rate > 0:
            # a little early rather than late: float sums must not carry it past the budget
            ahead.append(now + max(0.0, budget - job_cost(attempts, now)) / rate * 0.999)
    if job.next_try_at is not None:
        ahead.append(job.next_try_at)
    return min((t for t in ahead if t > now), default=float("inf"))
