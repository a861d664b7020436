"""How a RunPod pod becomes a gpuhop Instance: one explicit table per wire from RunPod's status
(GraphQL desiredStatus, REST v2 status) and a qualifier to InstanceState, the fault RunPod's words
name, where a pod is, and what the pod has cost (its `Bill`) by RunPod's own times.

RunPod has no "preempted" status: a reclaimed pod is EXITED with lastStatusChange "Outbid:
<date>", the one involuntary stop with a recorded cause, or, for an on-demand pod whose host went
away, "Machine offline: <date>" (*inferred*: what the simulator writes; RunPod does not document
the words). Both are PREEMPTED. "Exited by Runpod: ..." (spelled RunPod or Runpod, matched
case-insensitively) covers an unpullable image, an image too large and "Insufficient balance"
(PROVIDERS.md, late-2026 corrections): RunPod stopped the pod but did not take it back, so it is
EXITED, and `fault` says why from RunPod's words (IMAGE or ACCOUNT; None when the words name
neither). Over REST v2 an image RunPod cannot run is status ERROR and the words are in
`statusMessage` (*inferred*; `lastStatusChange` is read as well). A RUNNING pod has `runtime: null` until its container is
up. A pod whose job ended on its own is still RUNNING: the agent lingers (GPUHOP_LINGER=1), as
RunPod would otherwise restart the container, so the listing cannot tell an exit code.

Billing (PROVIDERS.md: per second while the pod runs): a pod is charged `costPerHr` for every
second from `lastStartedAt` (when it was rented or resumed) until it stopped, which is the date
in the `lastStatusChange` that stopped it ("Exited by user: <date>", "Outbid: <date>", ...).
RunPod states those dates to the second, so the bill is computed on whole seconds. Without
`lastStartedAt` a running pod's "Rented by User: <date>" / "Resumed by user: <date>" is used.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from orchestrator.models import Bill, Instance, InstanceFault, InstanceState

PROVIDER = "runpod"
_OUTBID = re.compile(r"^\s*outbid", re.IGNORECASE)
_HOST_LOST = re.compile(r"^\s*(machine|host)\s+(offline|lost|went away|unavailable|down)", re.IGNORECASE)
_BY_RUNPOD = re.compile(r"exited\s+by\s+run\s*pod", re.IGNORECASE)
_ACCOUNT = re.compile(r"insufficient\s+(balance|funds)|out of (credits|funds)", re.IGNORECASE)
_IMAGE = re.compile(r"\bpull|manifest|image\b.*\b(too large|not found|unauthori[sz]ed|denied)|too large",
                    re.IGNORECASE)
_STARTED = re.compile(r"^\s*(rented|resumed|started)\b", re.IGNORECASE)
# JavaScript's Date.toString(): "Mon Jan 05 2026 12:00:00 GMT+0000 (Coordinated Universal Time)"
_JS_DATE = re.compile(r"(\w{3} \d{1,2} \d{4} \d{1,2}:\d{2}:\d{2}) GMT([+-]\d{4})")
_DC_ID = re.compile(r"^[A-Z]{2}-[A-Z]{2,4}-\d+$")

# (desiredStatus, qualifier) -> state; qualifier "*" = any
STATUS_TABLE: dict[tuple[str, str], InstanceState] = {
    ("CREATED", "*"): InstanceState.PENDING,
    ("RUNNING", "no-runtime"): InstanceState.PENDING,  # pulling the image, starting
    ("RUNNING", "runtime"): InstanceState.RUNNING,
    ("RESTARTING", "*"): InstanceState.PENDING,
    ("EXITED", "outbid"): InstanceState.PREEMPTED,  # RunPod took the machine back
    ("EXITED", "host-lost"): InstanceState.PREEMPTED,  # the host went away (Community, mostly)
    ("EXITED", "by-runpod"): InstanceState.EXITED,  # image, size or balance: not a reclaim
    ("EXITED", "other"): InstanceState.EXITED,  # stopped (by a user); the agent reports the exit code
    ("PAUSED", "*"): InstanceState.EXITED,
    ("DEAD", "*"): InstanceState.PREEMPTED,  # the host died under it
    ("TERMINATED", "*"): InstanceState.TERMINATED,
}
# REST v2: (status, qualifier) -> state
REST_STATUS_TABLE: dict[tuple[str, str], InstanceState] = {
    ("PROVISIONING", "*"): InstanceState.PENDING,
    ("STARTING", "*"): InstanceState.PENDING,
    ("RUNNING", "*"): InstanceState.RUNNING,
    ("EXITED", "outbid"): InstanceState.PREEMPTED,
    ("EXITED", "host-lost"): InstanceState.PREEMPTED,
    ("EXITED", "by-runpod"): InstanceState.EXITED,
    ("EXITED", "other"): InstanceState.EXITED,
    ("ERROR", "*"): InstanceState.EXITED,  # RunPod could not run it (image): fault says why
    ("TERMINATED", "*"): InstanceState.TERMINATED,
}
UNKNOWN_STATE = InstanceState.PENDING  # a status RunPod adds later: keep watching, do not act


def stop_kind(words: str) -> str:
    """What stopped an EXITED pod, from RunPod's words: outbid, host-lost, by-runpod or other."""
    if _OUTBID.search(words):
        return "outbid"
    if _HOST_LOST.search(words):
        return "host-lost"
    return "by-runpod" if _BY_RUNPOD.search(words) else "other"


def fault_of(words: str, by_runpod: bool) -> InstanceFault | None:
    """The fault RunPod's own stop names (IMAGE, ACCOUNT); None for anything else."""
    if not by_runpod:
        return None
    if _ACCOUNT.search(words):
        return InstanceFault.ACCOUNT
    if _IMAGE.search(words):
        return InstanceFault.IMAGE
    return None


def qualifier(pod: dict[str, Any]) -> str:
    status = str(pod.get("desiredStatus") or "").upper()
    if status == "RUNNING":
        return "runtime" if pod.get("runtime") else "no-runtime"
    if status == "EXITED":
        return stop_kind(str(pod.get("lastStatusChange") or ""))
    return "*"


def pod_state(pod: dict[str, Any]) -> InstanceState:
    status = str(pod.get("desiredStatus") or "").upper()
    return STATUS_TABLE.get((status, qualifier(pod)), UNKNOWN_STATE)


def pod_region(pod: dict[str, Any], known: dict[str, str], volume_dcs: dict[str, str]) -> str:
    """machine.location when it is a data center id; else the data center we launched it in;
    else its network volume's data center; else whatever location says."""
    location = str((pod.get("machine") or {}).get("location") or "")
    if _DC_ID.match(location):
        return location
    return known.get(str(pod.get("id"))) or volume_dcs.get(str(pod.get("networkVolumeId") or "")) or location


def to_instance(pod: dict[str, Any], region: str, now: float) -> Instance:
    """A GraphQL pod as an Instance."""
    cost = pod.get("costPerHr")
    change = str(pod.get("lastStatusChange") or "")
    return Instance(
        provider=PROVIDER,
        instance_id=str(pod["id"]),
        name=str(pod.get("name") or ""),
        state=pod_state(pod),
        region=region,
        price_per_hour=float(cost) if isinstance(cost, int | float) else None,
        reason=change,
        fault=fault_of(change, qualifier(pod) == "by-runpod"),
        bill=pod_bill(pod, now),
        extra={
            "desired_status": str(pod.get("desiredStatus") or ""),
            "pod_type": str(pod.get("podType") or ""),
            "gpu": str((pod.get("machine") or {}).get("gpuDisplayName") or ""),
        },
    )


def status_time(text: str) -> float | None:
    """The date in a lastStatusChange ("Exited by user: Mon Jan 05 2026 12:00:00 GMT+0000
    (...)"), as UNIX seconds; None when there is none."""
    m = _JS_DATE.search(text or "")
    if not m:
        return None
    try:
        return datetime.strptime(f"{m.group(1)} {m.group(2)}", "%b %d %Y %H:%M:%S %z").timestamp()
    except ValueError:
        return None


def iso_time(value: Any) -> float | None:
    """An ISO 8601 time ("2026-01-05T12:00:00.000Z") as UNIX seconds; None when it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def pod_bill(pod: dict[str, Any], now: float) -> Bill | None:
    """What the pod has cost by RunPod's rule (see the module docstring), read at `now`; None
    when the answer does not say when billing began."""
    price = pod.get("costPerHr")
    if not isinstance(price, int | float) or isinstance(price, bool) or price < 0:
        return None
    status = str(pod.get("desiredStatus") or "").upper()
    change = str(pod.get("lastStatusChange") or "")
    started = iso_time(pod.get("lastStartedAt"))
    if started is None and status == "RUNNING" and _STARTED.search(change):
        started = status_time(change)
    if started is None:
        return None
    started = float(math.floor(started))
    if status == "RUNNING":
        ended: float | None = None
        until = float(math.floor(now))
    elif status in ("EXITED", "TERMINATED", "DEAD", "PAUSED"):
        stopped = status_time(change)
        if stopped is None or _STARTED.search(change):
            return None  # stopped, but the answer does not say when
        ended = until = max(started, stopped)
    else:
        return None  # not billing yet (CREATED) or a status RunPod adds later
    cost = max(0.0, until - started) * float(price) / 3600.0
    return Bill(started_at=started, ended_at=ended, cost_usd=round(cost, 6))


def _price(value: Any) -> float | None:
    """costPerHr: a number, or a decimal string as REST v1 answered it ("0.74")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def rest_instance(pod: dict[str, Any], known: dict[str, str], now: float) -> Instance:
    """A REST v2 pod as an Instance. Where it is: its data center on Secure Cloud, its country on
    Community (dataCenterId null); else the place we launched it in."""
    status = str(pod.get("status") or "").upper()
    message = str(pod.get("statusMessage") or "")
    change = str(pod.get("lastStatusChange") or "")
    words = message or change
    kind = stop_kind(words) if status == "EXITED" else "*"
    state = REST_STATUS_TABLE.get((status, kind), UNKNOWN_STATE)
    by_runpod = status == "ERROR" or kind == "by-runpod"
    price = _price(pod.get("costPerHr"))
    # the GraphQL-shaped view of the same facts, for the one billing rule
    billing = {
        "costPerHr": price,
        "desiredStatus": "RUNNING" if status in ("PROVISIONING", "STARTING", "RUNNING") else
        "TERMINATED" if status == "TERMINATED" else "EXITED",
        "lastStatusChange": change,
        "lastStartedAt": pod.get("lastStartedAt"),
    }
    pod_id = str(pod["id"])
    region = str(pod.get("dataCenterId") or pod.get("countryCode") or known.get(pod_id) or "")
    gpu: dict[str, Any] = pod["gpu"] if isinstance(pod.get("gpu"), dict) else {}
    return Instance(
        provider=PROVIDER,
        instance_id=pod_id,
        name=str(pod.get("name") or ""),
        state=state,
        region=region,
        price_per_hour=price,
        reason=" ".join(w for w in (message, change) if w) if message and message not in change else change or message,
        fault=fault_of(words + " " + change, by_runpod),
        bill=pod_bill(billing, now),
        extra={
            "status": status,
            "cloud_type": str(pod.get("cloudType") or ""),
            "gpu": str(gpu.get("displayName") or ""),
            "host_cuda": str(pod.get("hostCudaVersion") or ""),
        },
    )
