"""What bench/fault_storm.py concludes from what it collected: the volumes' step and activity
logs (written by bench/_storm_job.py), the daemon's jobs and attempts (its REST API), and the
simulator's ledger. Pure functions of that data, apart from `read_volumes`, so each figure is
defined in exactly one place and can be checked by hand against the raw files.

Definitions (the README section and the printed table use the same words):
* lost: a job that ended other than `succeeded` although nothing asked it to (the storm never
  cancels), or that the daemon no longer knows; stuck: not ended when the drain deadline passed.
* steps twice / skipped: from each job's append-only steps.log; a step number committed more
  than once, and a number missing below the last committed one (or below the job's target once
  the daemon says it succeeded).
* machines per attempt name: distinct pod/instance ids the ledger billed under one name
  `gpuhop-<job>-<n>`.
* writers per volume: the most processes writing into one volume at the same time (each
  process's span runs from its `begin` line to its last step or `end` line).
* healthy/finished attempts relaunched: attempts ended `lost` or `preempted` although the job's
  process on that machine either exited 0 without having received a SIGTERM, or (on a machine
  the benchmark did not take away) kept committing steps more than 2 s after the daemon ended
  the attempt. An exit 0 after the provider's SIGTERM is counted apart ("finished under a
  notice"): gpuhop's rule calls it preempted, since a job that saved and left with 0 looks
  the same, and the replacement then ends at once from the final checkpoint.
* leaked machines: pods/instances billing at the end that no live attempt owns; leaked volumes:
  volumes billing that neither a job's volume record nor any attempt points at (gpuhop keeps a
  job's volume after the job on purpose; one it has no record of is never cleaned up).
* cost error: |job cost_usd - sum of the ledger's charges for `gpuhop-<job>-*`| / ledger sum.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

LIVE_ATTEMPT = {"pending", "launching", "running"}
TERMINAL_JOB = {"succeeded", "failed", "cancelled"}
LATE_STEP_SECONDS = 2.0  # ended_at has 1 s resolution; a step this much later was not a dying gasp


@dataclass
class Runner:
    """One process of the job on one machine, as its volume saw it."""

    job: str
    attempt: str
    pid: str
    begin: float
    end: float
    exit_code: int | None = None
    sigterm: bool = False  # the process received a SIGTERM (a preemption notice) while it ran
    step_times: list[float] = field(default_factory=list)


@dataclass
class VolumeRecord:
    name: str
    runners: list[Runner]
    steps: dict[str, list[int]]  # job id -> committed step numbers, in log order


@dataclass
class Figures:
    jobs: int = 0
    lost: int = 0
    stuck: int = 0
    steps_twice: int = 0
    steps_skipped: int = 0
    machines_per_name: int = 0
    writers_per_volume: int = 0
    relaunched_healthy: int = 0
    finished_under_notice: int = 0  # exit 0 after a SIGTERM: ended `preempted` by rule, not a miss
    leaked_machines: int = 0
    leaked_volumes: int = 0
    cost_error: float | None = None  # max over jobs, as a fraction; None = nothing to compare
    cost_error_job: str = ""
    details: list[str] = field(default_factory=list)


def _lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line.split() for line in text.splitlines() if line.strip()]


def read_volumes(volumes_root: Path) -> list[VolumeRecord]:
    """Every volume directory under a simulator's `volumes/`, parsed."""
    out: list[VolumeRecord] = []
    if not volumes_root.is_dir():
        return out
    for vol in sorted(p for p in volumes_root.iterdir() if p.is_dir()):
        runners: dict[tuple[str, str, str], Runner] = {}
        for parts in _lines(vol / "activity.log"):
            if len(parts) < 6:
                continue
            kind, job, attempt, pid, when, last = parts[:6]
            key = (job, attempt, pid)
            if kind == "begin":
                runners.setdefault(key, Runner(job, attempt, pid, float(when), float(when)))
            elif kind == "term" and key in runners:
                runners[key].sigterm = True
            elif kind == "end" and key in runners:
                runners[key].end = max(runners[key].end, float(when))
                runners[key].exit_code = int(last)
        steps: dict[str, list[int]] = {}
        jobs_dir = vol / "jobs"
        for job_dir in sorted(jobs_dir.iterdir()) if jobs_dir.is_dir() else []:
            numbers: list[int] = []
            for parts in _lines(job_dir / "steps.log"):
                if len(parts) < 4:
                    continue
                numbers.append(int(parts[0]))
                runner = runners.get((job_dir.name, parts[1], parts[2]))
                if runner is not None:
                    t = float(parts[3])
                    runner.step_times.append(t)
                    runner.end = max(runner.end, t)
            steps[job_dir.name] = numbers
        out.append(VolumeRecord(vol.name, list(runners.values()), steps))
    return out


def step_audit(steps: list[int], target: int | None) -> tuple[int, int]:
    """(committed more than once, skipped) for one job's steps.log. `target` is the step count
    the job should have reached (it succeeded), else None (count gaps below the last step)."""
    seen: dict[int, int] = defaultdict(int)
    for s in steps:
        seen[s] += 1
    twice = sum(n - 1 for n in seen.values() if n > 1)
    top = target if target is not None else max(seen, default=0)
    skipped = sum(1 for s in range(1, top + 1) if s not in seen)
    return twice, skipped


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (a span ending when another begins does not overlap)."""
    events = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


def iso_ts(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def machine_rows(ledger: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [e for e in ledger.get("entries", [])
            if e.get("kind") in ("pod", "instance") and str(e.get("owner", "")).startswith(f"{prefix}-")]


def figures(
    jobs: list[dict[str, Any]],
    refused_ok: int,
    targets: dict[str, int],
    volumes: list[VolumeRecord],
    ledger: dict[str, Any],
    preempted: set[str],
    prefix: str = "gpuhop",
) -> Figures:
    """Every figure of one scenario. `jobs` are the daemon's answers for every job it accepted
    (an entry {"id": ..., "missing": True} for one it no longer knows); `targets` the step count
    of each; `preempted` the machine ids the benchmark took away itself."""
    f = Figures(jobs=len(jobs))
    del refused_ok  # refusals are reported by the caller; they are neither lost nor stuck
    by_id = {j["id"]: j for j in jobs}

    # lost / stuck
    for j in jobs:
        if j.get("missing"):
            f.lost += 1
            f.details.append(f"job {j['id']}: the daemon no longer knows it")
        elif j["status"] not in TERMINAL_JOB:
            f.stuck += 1
            f.details.append(f"job {j['id']}: stuck {j['status']} ({(j.get('message') or '')[:80]})")
        elif j["status"] != "succeeded":
            f.lost += 1
            f.details.append(f"job {j['id']}: {j['status']} ({(j.get('end_reason') or j.get('message') or '')[:80]})")

    # steps, writers
    runners_of: dict[tuple[str, str], list[Runner]] = defaultdict(list)
    for vol in volumes:
        for r in vol.runners:
            runners_of[(r.job, r.attempt)].append(r)
        writers = max_overlap([(r.begin, r.end) for r in vol.runners])
        if writers > 1:
            f.details.append(f"volume {vol.name}: {writers} processes wrote at once")
        f.writers_per_volume = max(f.writers_per_volume, writers)
        for job_id, steps in vol.steps.items():
            found = by_id.get(job_id)
            done = found is not None and found.get("status") == "succeeded"
            twice, skipped = step_audit(steps, targets.get(job_id) if done else None)
            if twice or skipped:
                f.details.append(f"job {job_id}: {twice} step(s) committed twice, {skipped} skipped")
            f.steps_twice += twice
            f.steps_skipped += skipped
    for j in jobs:  # a job that says it succeeded but never wrote a step skipped all of them
        if j.get("status") == "succeeded" and not any(j["id"] in v.steps for v in volumes):
            f.steps_skipped += targets.get(j["id"], 0)
            f.details.append(f"job {j['id']}: succeeded without a step in any volume")

    # attempts called lost/preempted while their process was fine or done
    for j in jobs:
        for a in j.get("attempts", []):
            if a.get("end_reason") not in ("lost", "preempted"):
                continue
            ended = iso_ts(a.get("ended_at"))
            rs = runners_of.get((j["id"], str(a["number"])), [])
            finished = any(r.exit_code == 0 and not r.sigterm for r in rs)
            late = (ended is not None and a.get("instance_id") not in preempted
                    and any(t > ended + LATE_STEP_SECONDS for r in rs for t in r.step_times))
            if a.get("end_reason") == "preempted" and any(r.exit_code == 0 and r.sigterm for r in rs):
                # it finished as the notice came: gpuhop cannot tell that from a job that saved
                # and left with 0, so the rule calls it preempted (the replacement ends at once)
                f.finished_under_notice += 1
                continue
            if finished or late:
                f.relaunched_healthy += 1
                f.details.append(f"job {j['id']} attempt {a['number']}: ended {a['end_reason']} but its "
                                 f"process {'exited 0' if finished else 'kept committing steps'}")

    # machines per name, leaks, cost
    rows = machine_rows(ledger, prefix)
    ids_by_name: dict[str, set[str]] = defaultdict(set)
    cost_by_job: dict[str, float] = defaultdict(float)
    for e in rows:
        ids_by_name[e["owner"]].add(str(e["id"]))
        parts = str(e["owner"]).split("-")
        if len(parts) >= 3:
            cost_by_job[parts[-2]] += float(e.get("cost_usd") or 0.0)
    for name, ids in ids_by_name.items():
        if len(ids) > 1:
            f.details.append(f"{name}: {len(ids)} machines ({', '.join(sorted(ids))})")
    f.machines_per_name = max((len(ids) for ids in ids_by_name.values()), default=0)
    live = {(a.get("name"), a.get("instance_id")) for j in jobs for a in j.get("attempts", [])
            if a.get("status") in LIVE_ATTEMPT}
    unplaced = {n for n, i in live if not i}  # recorded, the provider's id not known yet
    for e in ledger.get("entries", []):
        if e.get("kind") not in ("pod", "instance") or not e.get("running"):
            continue
        if (e.get("owner"), str(e["id"])) not in live and e.get("owner") not in unplaced:
            f.leaked_machines += 1
            f.details.append(f"leaked machine {e['id']} ({e.get('owner') or 'no name'}) still billing")
    known_volumes = {str((j.get("volume") or {}).get("volume_id")) for j in jobs if j.get("volume")}
    known_volumes |= {str(a.get("volume_id")) for j in jobs for a in j.get("attempts", []) if a.get("volume_id")}
    billing_by_name: dict[str, int] = defaultdict(int)
    for e in ledger.get("entries", []):
        if e.get("kind") != "volume" or not e.get("running"):
            continue
        billing_by_name[str(e.get("owner"))] += 1
        if str(e["id"]) not in known_volumes:
            f.leaked_volumes += 1
            f.details.append(f"leaked volume {e['id']} ({e.get('owner')}): billing, neither the job's volume "
                             "record nor any attempt names it")
    for name, n in billing_by_name.items():
        if n > 1:
            f.details.append(f"volume name {name}: {n} volumes billing")
    worst: float | None = None
    for j in jobs:
        if j.get("missing") or j.get("status") not in TERMINAL_JOB:
            continue
        billed = cost_by_job.get(j["id"], 0.0)
        ours = float(j.get("cost_usd") or 0.0)
        if billed <= 0.0 and ours <= 0.0:
            continue
        err = abs(ours - billed) / billed if billed > 0 else float("inf")
        if worst is None or err > worst:
            worst, f.cost_error_job = err, f"{j['id']}: gpuhop ${ours:.6f} vs ledger ${billed:.6f}"
    f.cost_error = worst
    return f
