"""reconcile.decide as tables: (job, attempts, observations, now) -> actions. No I/O."""

from __future__ import annotations

import pytest

from orchestrator.models import AttemptStatus, EndReason, Instance, InstanceState, JobStatus, Policy
from orchestrator.reconcile import (
    Adopt,
    AttemptView,
    EndAttempt,
    Finish,
    JobView,
    Launch,
    MarkRunning,
    RetryLaunch,
    SetStatus,
    Settings,
    Terminate,
    attempt_cost,
    decide,
    quiet_until,
)

NOW = 10_000.0
CFG = Settings(launch_grace_seconds=30, heartbeat_timeout_seconds=60, remote_providers=frozenset({"runpod"}))


def job(**kw: object) -> JobView:
    policy = kw.pop("policy", Policy())
    return JobView(id="j1", status=kw.pop("status", JobStatus.RUNNING), policy=policy, **kw)  # type: ignore[arg-type]


def att(number: int = 1, status: AttemptStatus = AttemptStatus.RUNNING, provider: str = "local", **kw: object) -> AttemptView:
    defaults: dict[str, object] = {
        "instance_id": f"i-{number}" if status != AttemptStatus.PENDING else None,
        "launched_at": NOW - 100 if status != AttemptStatus.PENDING else None,
        "running_at": NOW - 90 if status == AttemptStatus.RUNNING else None,
        "price_per_hour": 3.6,
    }
    defaults.update(kw)
    return AttemptView(id=number, number=number, name=f"gpuhop-j1-{number}", provider=provider, status=status, **defaults)  # type: ignore[arg-type]


def inst(state: InstanceState, number: int = 1, provider: str = "local", **kw: object) -> Instance:
    return Instance(provider=provider, instance_id=f"i-{number}", name=f"gpuhop-j1-{number}", state=state, **kw)  # type: ignore[arg-type]


def kinds(actions: list[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


CASES = [
    # (id, job, attempts, observed instances, readable providers, expected action kinds, check)
    ("no attempts yet: place it", job(status=JobStatus.QUEUED), [], [], {"local"}, ["Launch"], None),
    ("running and seen running: nothing to do", job(), [att()], [inst(InstanceState.RUNNING)], {"local"}, [], None),
    ("launching becomes running", job(status=JobStatus.LAUNCHING), [att(status=AttemptStatus.LAUNCHING)],
     [inst(InstanceState.RUNNING)], {"local"}, ["MarkRunning", "SetStatus"], None),
    ("exit 0 succeeds and cleans up", job(), [att()], [inst(InstanceState.EXITED, exit_code=0)], {"local"},
     ["EndAttempt", "Terminate", "Finish"], lambda d: d.actions[2] == Finish(JobStatus.SUCCEEDED, "succeeded")),
    ("exit 3 fails the job, code in the reason", job(), [att()], [inst(InstanceState.EXITED, exit_code=3)], {"local"},
     ["EndAttempt", "Terminate", "Finish"], lambda d: d.actions[2] == Finish(JobStatus.FAILED, "exit code 3")),
    ("exit 3 with a retry left relaunches", job(policy=Policy(max_retries_on_error=1)), [att()],
     [inst(InstanceState.EXITED, exit_code=3)], {"local"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"],
     lambda d: d.retries == 1),
    ("killed by a foreign signal is lost and relaunched", job(), [att()],
     [inst(InstanceState.EXITED, exit_signal=9)], {"local"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"],
     lambda d: d.actions[0].reason == EndReason.LOST and d.relaunches == 1),
    ("vanished without exit code is lost", job(), [att()], [], {"local"},
     ["EndAttempt", "Terminate", "SetStatus", "Launch"], lambda d: d.actions[0].reason == EndReason.LOST),
    ("terminated listing without code is lost", job(), [att()], [inst(InstanceState.TERMINATED, reason="agent vanished")],
     {"local"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"], lambda d: d.actions[0].detail == "agent vanished"),
    ("fresh launch missing from listing: wait", job(status=JobStatus.LAUNCHING),
     [att(status=AttemptStatus.LAUNCHING, launched_at=NOW - 5)], [], {"local"}, [], None),
    ("preempted by the provider", job(), [att(provider="runpod", last_heartbeat_at=NOW)],
     [inst(InstanceState.PREEMPTED, provider="runpod", reason="Exited by Runpod")], {"runpod"},
     ["EndAttempt", "Terminate", "SetStatus", "Launch"], lambda d: d.actions[0].reason == EndReason.PREEMPTED),
    ("relaunch limit reached: give up", job(relaunches=2, policy=Policy(max_relaunches=2)), [att()], [], {"local"},
     ["EndAttempt", "Terminate", "Finish"], lambda d: d.actions[-1].status == JobStatus.FAILED and "max_relaunches" in d.actions[-1].end_reason),
    ("provider unreadable: wait, decide nothing", job(), [att(provider="runpod")], [], {"local"}, [], None),
    ("pending and seen: adopt", job(status=JobStatus.LAUNCHING), [att(status=AttemptStatus.PENDING)],
     [inst(InstanceState.PENDING)], {"local"}, ["Adopt"], lambda d: d.actions[0] == Adopt(1, "i-1")),
    ("pending and unseen: launch again by name", job(status=JobStatus.LAUNCHING), [att(status=AttemptStatus.PENDING)],
     [], {"local"}, ["RetryLaunch"], lambda d: d.actions[0] == RetryLaunch(1)),
    ("a launch in flight leaves a recovering job recovering", job(status=JobStatus.RECOVERING),
     [att(status=AttemptStatus.ENDED, end_reason=EndReason.PREEMPTED), att(2, status=AttemptStatus.PENDING)],
     [inst(InstanceState.PENDING, 2)], {"local"}, ["Adopt", "SetStatus"],
     lambda d: d.actions[-1] == SetStatus(JobStatus.LAUNCHING)),
    ("an unconfirmed launch does not make a job launching", job(status=JobStatus.RECOVERING),
     [att(status=AttemptStatus.ENDED, end_reason=EndReason.PREEMPTED), att(2, status=AttemptStatus.PENDING)],
     [], {"local"}, ["RetryLaunch"], None),
    ("cancel ends and stops every live attempt", job(cancel_requested=True), [att()], [inst(InstanceState.RUNNING)],
     {"local"}, ["EndAttempt", "Terminate", "Finish"], lambda d: d.actions[-1].status == JobStatus.CANCELLED),
    ("cancel while queued", job(status=JobStatus.QUEUED, cancel_requested=True), [], [], {"local"}, ["Finish"], None),
    ("remote agent reported exit 0", job(), [att(provider="runpod", agent_state="exited", exit_code=0, last_heartbeat_at=NOW)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}, ["EndAttempt", "Terminate", "Finish"], None),
    ("exit after a foreign SIGTERM is a preemption, not success", job(),
     [att(provider="runpod", agent_state="exited", exit_code=0, sigterm_received=True, last_heartbeat_at=NOW)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"],
     lambda d: d.actions[0].reason == EndReason.PREEMPTED),
    ("killed by SIGTERM after the provider's SIGTERM is a preemption", job(),
     [att(provider="runpod", agent_state="exited", exit_signal=15, sigterm_received=True, last_heartbeat_at=NOW)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"],
     lambda d: d.actions[0].reason == EndReason.PREEMPTED and "signal 15" in d.actions[0].detail),
    ("killed by SIGKILL past the notice is a preemption", job(),
     [att(provider="runpod", agent_state="exited", exit_signal=9, sigterm_received=True, last_heartbeat_at=NOW)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"],
     lambda d: d.actions[0].reason == EndReason.PREEMPTED),
    ("another signal after a SIGTERM is still lost", job(),
     [att(provider="runpod", agent_state="exited", exit_signal=11, sigterm_received=True, last_heartbeat_at=NOW)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"],
     lambda d: d.actions[0].reason == EndReason.LOST and "signal 11" in d.actions[0].detail),
    ("finished, then the machine was taken: the agent's exit report decides", job(),
     [att(provider="runpod", agent_state="exited", exit_code=0, last_heartbeat_at=NOW)],
     [inst(InstanceState.PREEMPTED, provider="runpod", reason="Machine offline")], {"runpod"},
     ["EndAttempt", "Terminate", "Finish"], lambda d: d.actions[0].reason == EndReason.SUCCEEDED),
    ("taken without an exit report: preempted", job(), [att(provider="runpod", last_heartbeat_at=NOW)],
     [inst(InstanceState.PREEMPTED, provider="runpod", reason="Machine offline")], {"runpod"},
     ["EndAttempt", "Terminate", "SetStatus", "Launch"], lambda d: d.actions[0].reason == EndReason.PREEMPTED),
    ("silent remote agent is lost", job(), [att(provider="runpod", last_heartbeat_at=NOW - 61)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"],
     lambda d: "no report from the agent" in d.actions[0].detail),
    ("budget reached stops the running attempt", job(policy=Policy(max_cost_usd=0.05)), [att()],
     [inst(InstanceState.RUNNING)], {"local"}, ["EndAttempt", "Terminate", "Finish"],
     lambda d: d.actions[0].reason == EndReason.BUDGET and d.actions[-1].end_reason.startswith("budget")),
    ("budget spent: no relaunch after a loss", job(policy=Policy(max_cost_usd=0.05)), [att()], [], {"local"},
     ["EndAttempt", "Terminate", "Finish"], lambda d: d.actions[-1].status == JobStatus.FAILED),
    ("reclaim notice: replacement launched early", job(), [att(provider="runpod", interruption_at=NOW - 1, last_heartbeat_at=NOW)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}, ["Launch"], lambda d: d.actions[0] == Launch(early=True)),
    ("notice with the replacement already pending: no second launch", job(),
     [att(provider="runpod", interruption_at=NOW - 1, last_heartbeat_at=NOW), att(2, status=AttemptStatus.LAUNCHING, provider="runpod", launched_at=NOW - 1)],
     [inst(InstanceState.RUNNING, provider="runpod"), inst(InstanceState.PENDING, 2, provider="runpod")], {"runpod"}, [], None),
    ("replacement up: the warned attempt hands over and stops", job(),
     [att(provider="runpod", interruption_at=NOW - 1, last_heartbeat_at=NOW), att(2, status=AttemptStatus.LAUNCHING, provider="runpod", launched_at=NOW - 1)],
     [inst(InstanceState.RUNNING, provider="runpod"), inst(InstanceState.RUNNING, 2, provider="runpod")], {"runpod"},
     ["MarkRunning", "EndAttempt", "Terminate"],
     lambda d: d.actions[1].reason == EndReason.PREEMPTED and "handed over to attempt 2" in d.actions[1].detail and d.relaunches == 1),
    ("replacement finishing ends the old attempt too", job(),
     [att(provider="runpod", interruption_at=NOW - 1, last_heartbeat_at=NOW), att(2, provider="runpod", agent_state="exited", exit_code=0, last_heartbeat_at=NOW)],
     [inst(InstanceState.RUNNING, provider="runpod"), inst(InstanceState.RUNNING, 2, provider="runpod")], {"runpod"},
     ["EndAttempt", "Terminate", "EndAttempt", "Terminate", "Finish"], None),
    ("waiting for capacity: backoff not over", job(status=JobStatus.RECOVERING, next_try_at=NOW + 5),
     [att(status=AttemptStatus.ENDED, end_reason=EndReason.PREEMPTED)], [], {"local"}, [], None),
    ("stopped by gpuhop is not a success", job(), [att()], [inst(InstanceState.EXITED, exit_code=0, stopped_by_us=True)],
     {"local"}, ["EndAttempt", "Terminate", "SetStatus", "Launch"], lambda d: d.actions[0].reason == EndReason.CANCELLED),
]


@pytest.mark.parametrize(("job_", "attempts", "observed", "readable", "expected", "check"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(job_, attempts, observed, readable, expected, check) -> None:  # type: ignore[no-untyped-def]
    d = decide(job_, attempts, {i.name: i for i in observed}, readable, NOW, CFG)
    assert kinds(d.actions) == expected
    if check is not None:
        assert check(d), d.actions


def test_terminate_targets_the_right_instance() -> None:
    d = decide(job(), [att()], {"gpuhop-j1-1": inst(InstanceState.EXITED, exit_code=0)}, {"local"}, NOW, CFG)
    assert Terminate(1, "i-1") in d.actions
    assert isinstance(d.actions[0], EndAttempt) and d.actions[0].exit_code == 0


def test_cost_is_price_times_billed_time() -> None:
    a = att(price_per_hour=3.6, launched_at=NOW - 100)
    assert attempt_cost(a, NOW) == pytest.approx(0.1)
    ended = att(status=AttemptStatus.ENDED, cost_usd=1.25)
    assert attempt_cost(ended, NOW) == 1.25
    assert attempt_cost(att(status=AttemptStatus.PENDING), NOW) == 0.0


def test_mark_running_sets_job_running() -> None:
    d = decide(job(status=JobStatus.LAUNCHING), [att(status=AttemptStatus.LAUNCHING)],
               {"gpuhop-j1-1": inst(InstanceState.RUNNING)}, {"local"}, NOW, CFG)
    assert d.actions == [MarkRunning(1), SetStatus(JobStatus.RUNNING)]


QUIET = [c for c in CASES if not c[5]]  # the table's cases in which deciding asks for nothing
CLOCKED = [  # quiet now, and a clock rule fires later: (id, job, attempts, observed, readable)
    ("remote heartbeat times out", job(), [att(provider="runpod", last_heartbeat_at=NOW - 10)],
     [inst(InstanceState.RUNNING, provider="runpod")], {"runpod"}),
    ("launch grace ends for a machine not listed", job(status=JobStatus.LAUNCHING),
     [att(status=AttemptStatus.LAUNCHING, launched_at=NOW - 5)], [], {"local"}),
    ("remote exit without a code: the agent's grace ends", job(),
     [att(provider="runpod", launched_at=NOW - 10, last_heartbeat_at=NOW)],
     [inst(InstanceState.EXITED, provider="runpod")], {"runpod"}),
    ("the budget is reached while it runs", job(policy=Policy(max_cost_usd=0.2)), [att()],
     [inst(InstanceState.RUNNING)], {"local"}),
    ("the backoff ends", job(status=JobStatus.RECOVERING, next_try_at=NOW + 5),
     [att(status=AttemptStatus.ENDED, end_reason=EndReason.PREEMPTED)], [], {"local"}),
]


@pytest.mark.parametrize(("job_", "attempts", "observed", "readable"),
                         [c[1:5] for c in QUIET] + [c[1:] for c in CLOCKED],
                         ids=[c[0] for c in QUIET] + [c[0] for c in CLOCKED])
def test_a_quiet_job_stays_quiet_until_its_horizon(job_, attempts, observed, readable) -> None:  # type: ignore[no-untyped-def]
    """The engine skips deciding a job whose inputs did not change until `quiet_until`: at any
    moment before it, deciding again must ask for nothing, or the skip would miss a rule."""
    seen = {i.name: i for i in observed}
    assert decide(job_, attempts, seen, readable, NOW, CFG).actions == []
    until = quiet_until(job_, attempts, NOW, CFG)
    assert until > NOW
    step = min(until - NOW, 10_000.0) / 50
    for k in range(50):
        t = NOW + k * step
        assert decide(job_, attempts, seen, readable, t, CFG).actions == [], f"acted at {t - NOW:.3f} s"


@pytest.mark.parametrize(("job_", "attempts", "observed", "readable"), [c[1:] for c in CLOCKED],
                         ids=[c[0] for c in CLOCKED])
def test_the_horizon_is_when_a_clock_rule_fires(job_, attempts, observed, readable) -> None:  # type: ignore[no-untyped-def]
    """...and it is not far off: shortly after it, the clock rule acts (so the skip costs at
    most one tick of lateness, none past the horizon)."""
    until = quiet_until(job_, attempts, NOW, CFG)
    assert until < float("inf")
    later = decide(job_, attempts, {i.name: i for i in observed}, readable, until + 0.01 * (until - NOW) + 0.001, CFG)
    assert later.actions, f"nothing happened after the horizon {until - NOW:.1f} s"


def test_an_attempt_newer_than_the_listing_is_never_skipped() -> None:
    a = att(status=AttemptStatus.LAUNCHING, launched_at=NOW - 1, created_at=NOW - 2)
    assert quiet_until(job(status=JobStatus.LAUNCHING), [a], NOW, CFG, {"local": NOW - 3}) == NOW
