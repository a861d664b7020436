"""`[providers.local]`: how much of this machine gpuhop may use, what it costs, and how local jobs
are kept apart from the daemon and from each other. Its own module so that the rest of the local
adapter reads validated, typed values only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.gpus import canonical_gpu

_REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Isolation = Literal["auto", "container", "user", "none"]


class LocalSettings(BaseModel):
    """`[providers.local]`: how much of this machine gpuhop may use, and what it costs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gpu_model: str | None = Field(default=None)
    """The machine's GPU model (any known spelling; stored canonical). None = ask nvidia-smi."""

    gpu_slots: int | None = Field(default=None, ge=0, le=64)
    """GPUs gpuhop may use. None = every GPU nvidia-smi reports (0 when there is none)."""

    cpu_slots: int = Field(default=2, ge=0, le=1024)
    """How many CPU-only jobs (gpu_count = 0) may run at once."""

    price_per_gpu_hour: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    """What one GPU of this machine costs per hour, in USD (power, or an opportunity cost)."""

    cpu_slot_price_per_hour: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    """What one CPU-only slot costs per hour, in USD."""

    region: str = "local"
    """Where this machine's volumes live, as placement sees it."""

    stop_grace_seconds: float = Field(default=10, ge=0, le=3600, allow_inf_nan=False)
    """terminate(): seconds between SIGTERM and SIGKILL, for the job to checkpoint."""

    workdir: Path | None = None
    """Directory local jobs start in (relative paths: to where the daemon was started).
    None = a scratch directory of each instance's own. Not used for container jobs."""

    isolation: Isolation = "auto"
    """How local jobs are kept from the daemon's secrets and from each other: "container" (the
    job's image under docker or podman), "user" (a uid of its own per volume; the daemon must
    run as root), "none" (as the daemon's own user: a job can read the state dir), or "auto"
    (container if a runtime answers, else user if possible, else none, with a warning)."""

    volumes_dir: Path | None = None
    """Where local volumes (and each attempt's scratch dir) live, outside the state dir.
    None = `<state_dir>-volumes` next to the state dir (e.g. /var/lib/gpuhop-volumes)."""

    job_uid_range: tuple[int, int] = (200000, 265535)
    """uids (and as many gids) handed to local jobs under "user" and "container" isolation: one
    per volume, one per attempt without a volume. Nothing else on the machine may use them."""

    job_groups: list[int] = Field(default_factory=list, max_length=16)
    """Supplementary gids given to job users, e.g. the group owning /dev/nvidia* where it is
    not world-accessible."""

    container_runtime: str | None = None
    """"docker", "podman" or a path to one. None = the first of docker, podman that answers."""

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"{value} is not a directory")
        return path

    @field_validator("volumes_dir")
    @classmethod
    def _volumes_dir(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @field_validator("gpu_model")
    @classmethod
    def _canonical(cls, value: str | None) -> str | None:
        if value is None:
            return None
        gpu = canonical_gpu(value)
        if gpu is None:
            raise ValueError(f"unknown GPU model {value!r}; see `gpuhop gpus` for the known names")
        return gpu.name

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION_RE.fullmatch(value):
            raise ValueError("region must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("container_runtime")
    @classmethod
    def _runtime(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9/._-]{1,255}", value):
            raise ValueError("container_runtime must be a program name or path")
        return value

    @model_validator(mode="after")
    def _uid_range(self) -> LocalSettings:
        low, high = self.job_uid_range
        if not (1000 <= low <= high < 2**31 - 1):
            raise ValueError("job_uid_range must be [low, high] with 1000 <= low <= high < 2^31-1")
        if any(not (0 < g < 2**31 - 1) for g in self.job_groups):
            raise ValueError("job_groups must be numeric gids above 0")
        return self
