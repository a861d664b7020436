"""Test-side helpers on top of simulators.harness: the example training job's spec, where a
simulator keeps a job's volume, and what a job's attempts say about where it was launched."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from simulators.harness import Daemon, SimProcess, free_port, pids_alive, steps_done, wait_for

__all__ = [
    "TRAIN", "Daemon", "SimProcess", "assert_launches", "free_port", "launched", "pids_alive", "sim_volume_dir",
    "steps_done", "train_spec", "wait_for",
]

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"


def train_spec(name: str, steps: int, step_seconds: float = 0.2, volume: str | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "command": [sys.executable, str(TRAIN), "--steps", str(steps), "--step-seconds", str(step_seconds)],
        "resources": {"gpu_count": 0},
        "policy": {"checkpoint_interval": 1, "max_relaunches": 5},
    }
    if volume:
        spec["volume"] = {"name": volume, "size_gb": 1}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


def sim_volume_dir(sim: SimProcess, job: dict[str, Any]) -> Path:
    """Where a simulator keeps the job's volume (the directory its machines see)."""
    return Path(sim.state_dir) / "volumes" / job["volume"]["volume_id"]


def launched(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts a provider accepted. The API also shows a launch in flight: the write-ahead
    attempt, status "pending", recorded before the provider is asked and removed again when
    the provider answers "no capacity". That one is an intention, not a placement."""
    return [a for a in job["attempts"] if a["status"] != "pending"]


def assert_launches(job: dict[str, Any], regions: list[str]) -> None:
    """The job was launched exactly in `regions` (one per accepted attempt, in order), and any
    launch in flight is a single one, aimed at the last of them."""
    assert [a["region"] for a in launched(job)] == regions, job["attempts"]
    pending = [a for a in job["attempts"] if a["status"] == "pending"]
    assert len(pending) <= 1, f"more than one launch in flight: {pending}"
    assert all(a["region"] == regions[-1] for a in pending), f"a launch aimed elsewhere: {pending}"
