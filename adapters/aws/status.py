"""EC2's view of an instance, normalized: one explicit table from EC2 states to gpuhop's, plus
the state reason that tells a spot reclaim from an ordinary end.

EC2 states: pending, running, stopping, stopped, shutting-down, terminated. A reclaimed spot
instance ends `terminated` (or `stopped`) with StateReason `Server.SpotInstanceTermination`
(`Server.SpotInstanceShutdown`); that, not the state, is what makes it PREEMPTED. A stopped
instance that was not reclaimed is EXITED: the machine is off, so the job is not running (our
bootstrap powers off when the job ends); its exit code comes from the agent, not from EC2. An
instance that ended after a spot notice this adapter received is PREEMPTED whatever the reason.

A launch EC2 accepted can still fail: the instance goes pending -> terminated with StateReason
`Server.InsufficientInstanceCapacity` (the capacity was not there at boot) or
`Server.InternalError`. That is a failed launch, not a lost job: the instance carries
`fault = LAUNCH_CAPACITY` with EC2's words as its reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orchestrator.models import Instance, InstanceFault, InstanceState

STATES: dict[str, InstanceState] = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.STOPPING,
    "shutting-down": InstanceState.STOPPING,
    "stopped": InstanceState.EXITED,
    "terminated": InstanceState.TERMINATED,
}
SPOT_REASONS = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})
LAUNCH_FAILED_REASONS = frozenset({"Server.InsufficientInstanceCapacity", "Server.InternalError"})

TAG_MANAGED = "gpuhop:managed"
TAG_JOB = "gpuhop:job"
TAG_ATTEMPT = "gpuhop:attempt"
TAG_VOLUME = "gpuhop:volume"
TAG_PRICE = "gpuhop:price"


def tags_of(raw: dict[str, Any]) -> dict[str, str]:
    return {str(t.get("Key")): str(t.get("Value", "")) for t in raw.get("Tags") or []}


def normalize_state(state_name: str, reason_code: str, noticed: bool = False) -> InstanceState:
    """`noticed`: a spot interruption notice was seen for it, so an end is the reclaim's doing
    even when the machine powered off first (the job exited on the notice)."""
    state = STATES.get(state_name, InstanceState.TERMINATED)
    if state_name in ("stopped", "terminated") and (reason_code in SPOT_REASONS or noticed):
        return InstanceState.PREEMPTED
    return state


def fault_of(state_name: str, reason_code: str) -> InstanceFault | None:
    """What an ended instance's StateReason says beyond its state."""
    if state_name in ("shutting-down", "terminated") and reason_code in LAUNCH_FAILED_REASONS:
        return InstanceFault.LAUNCH_CAPACITY
    return None


def to_instance(
    raw: dict[str, Any],
    *,
    notices: dict[str, datetime],
    terminated_by_us: set[str],
) -> Instance:
    """An EC2 `Instances[]` entry as gpuhop's Instance."""
    tags = tags_of(raw)
    instance_id = str(raw["InstanceId"])
    state_name = str((raw.get("State") or {}).get("Name", ""))
    reason = raw.get("StateReason") or {}
    reason_code = str(reason.get("Code") or "")
    price = tags.get(TAG_PRICE)
    extra = {
        "instance_type": str(raw.get("InstanceType", "")),
        "market": "spot" if raw.get("InstanceLifecycle") == "spot" else "on-demand",
        "ec2_state": state_name,
    }
    if tags.get(TAG_VOLUME):
        extra["volume_id"] = tags[TAG_VOLUME]
    return Instance(
        provider="aws",
        instance_id=instance_id,
        name=tags.get("Name", ""),
        state=normalize_state(
            state_name, reason_code, noticed=instance_id in notices and instance_id not in terminated_by_us
        ),
        region=str((raw.get("Placement") or {}).get("AvailabilityZone", "")),
        price_per_hour=float(price) if price else None,
        stopped_by_us=instance_id in terminated_by_us,
        reason=str(reason.get("Message") or raw.get("StateTransitionReason") or ""),
        interruption_at=notices.get(instance_id),
        fault=fault_of(state_name, reason_code),
        extra=extra,
    )


def attached_volumes(raw: dict[str, Any]) -> set[str]:
    return {
        str(m["Ebs"]["VolumeId"])
        for m in raw.get("BlockDeviceMappings") or []
        if m.get("Ebs", {}).get("VolumeId")
    }
