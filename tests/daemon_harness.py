"""Test-side helpers on top of simulators.harness: the example training job's spec."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from simulators.harness import Daemon, SimProcess, free_port, pids_alive, steps_done, wait_for

__all__ = [
    "TRAIN", "Daemon", "SimProcess", "free_port", "pids_alive", "sim_volume_dir", "steps_done", "train_spec",
    "wait_for",
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
