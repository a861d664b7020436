"""How a RunPod pod becomes a gpuhop Instance: one explicit table from RunPod's
(desiredStatus, qualifier) to InstanceState, and where a pod's data center is found.

RunPod has no "preempted" status: a reclaimed interruptible pod is EXITED with lastStatusChange
"Exited by Runpod: <date>" (spelling varies, so matched case-insensitively), and a RUNNING pod
has `runtime: null` until its container is up.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.models import Instance, InstanceState

PROVIDER = "runpod"
_BY_RUNPOD = re.compile(r"exited\s+by\s+run\s*pod", re.IGNORECASE)
_DC_ID = re.compile(r"^[A-Z]{2}-[A-Z]{2,4}-\d+$")

# (desiredStatus, qualifier) -> state; qualifier "*" = any
STATUS_TABLE: dict[tuple[str, str], InstanceState] = {
    ("CREATED", "*"): InstanceState.PENDING,
    ("RUNNING", "no-runtime"): InstanceState.PENDING,  # pulling the image, starting
    ("RUNNING", "runtime"): InstanceState.RUNNING,
    ("RESTARTING", "*"): InstanceState.PENDING,
    ("EXITED", "by-runpod"): InstanceState.PREEMPTED,  # reclaimed (spot) or host taken away
    ("EXITED", "other"): InstanceState.EXITED,  # stopped; the agent reports the exit code
    ("PAUSED", "*"): InstanceState.EXITED,
    ("DEAD", "*"): InstanceState.PREEMPTED,  # the host died under it
    ("TERMINATED", "*"): InstanceState.TERMINATED,
}
UNKNOWN_STATE = InstanceState.PENDING  # a status RunPod adds later: keep watching, do not act


def qualifier(pod: dict[str, Any]) -> str:
    status = str(pod.get("desiredStatus") or "").upper()
    if status == "RUNNING":
        return "runtime" if pod.get("runtime") else "no-runtime"
    if status == "EXITED":
        return "by-runpod" if _BY_RUNPOD.search(str(pod.get("lastStatusChange") or "")) else "other"
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


def to_instance(pod: dict[str, Any], region: str) -> Instance:
    cost = pod.get("costPerHr")
    return Instance(
        provider=PROVIDER,
        instance_id=str(pod["id"]),
        name=str(pod.get("name") or ""),
        state=pod_state(pod),
        region=region,
        price_per_hour=float(cost) if isinstance(cost, int | float) else None,
        reason=str(pod.get("lastStatusChange") or ""),
        extra={
            "desired_status": str(pod.get("desiredStatus") or ""),
            "pod_type": str(pod.get("podType") or ""),
            "gpu": str((pod.get("machine") or {}).get("gpuDisplayName") or ""),
        },
    )
