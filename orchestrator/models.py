"""Domain types shared by the daemon and every adapter: what a job asks for, what a provider
offers, what an instance looks like once normalized, and the enums that name their states.

No I/O lives here. Everything that crosses the line between the engine and an adapter is one of
these types, so nothing provider-specific leaks into the engine and adapters never see the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

from orchestrator.gpus import GPUS, canonical_gpu

# --------------------------------------------------------------------------- enums


class JobStatus(StrEnum):
    QUEUED = "queued"
    LAUNCHING = "launching"
    RUNNING = "running"
    RECOVERING = "recovering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class AttemptStatus(StrEnum):
    PENDING = "pending"  # recorded (write-ahead), launch not yet confirmed by the provider
    LAUNCHING = "launching"  # the provider accepted it; not running yet (booting, pulling)
    RUNNING = "running"
    ENDED = "ended"


class EndReason(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"
    LOST = "lost"
    NO_CAPACITY = "no_capacity"
    CANCELLED = "cancelled"
    BUDGET = "budget"


class CapacityType(StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"


class CapacityPreference(StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"
    AUTO = "auto"


class InstanceState(StrEnum):
    """The small common set every provider's statuses are mapped onto (one table per adapter)."""

    PENDING = "pending"  # accepted, booting, pulling the image
    RUNNING = "running"
    STOPPING = "stopping"  # on its way out (terminating, shutting-down)
    PREEMPTED = "preempted"  # the provider took it (spot reclaim, "Outbid"; not "Exited by RunPod")
    EXITED = "exited"  # the job's process ended; exit code or signal may be known
    TERMINATED = "terminated"  # gone for good (deleted by us or by the provider)


class InstanceFault(StrEnum):
    """Why the provider ended an instance when it was neither the job's exit nor a reclaim.
    Adapters set it from the provider's own words; `reconcile` decides what each means."""

    IMAGE = "image"  # the image cannot be pulled or run there (bad name, too large): the job fails
    ACCOUNT = "account"  # stopped for the account (insufficient balance): the provider is suspended
    LAUNCH_CAPACITY = "launch_capacity"  # ended before it ran, for want of capacity: a failed launch


# --------------------------------------------------------------------------- the job spec

# Every pattern is matched whole with fullmatch: `$` would also accept a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_REGION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
_MOUNT_RE = re.compile(r"[A-Za-z0-9/._-]+")
_CUDA_RE = re.compile(r"[0-9]{1,2}\.[0-9]{1,2}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_ENV_VALUE = 32 * 1024
MAX_COMMAND_ARG = 64 * 1024
RESERVED_ENV_PREFIX = "GPUHOP_"



def _a_json_number(value: object) -> object:
    """Numbers are taken only as numbers: `true` or "1" is not a GPU count. (A whole number
    written 2.0 is still an integer, as JSON Schema has it; 2.5 is refused by the int check.)"""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number (not a string or a boolean)")
    return value


StrictInt = Annotated[int, BeforeValidator(_a_json_number)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_a_json_number)]
PricePerHour = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False), BeforeValidator(_a_json_number)]
CostUsd = Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False), BeforeValidator(_a_json_number)]


def _shown(value: str, limit: int = 64) -> str:
    """A caller's text quoted for an error message: short, and escaped (repr) so that control
    characters and lone surrogates cannot break the JSON or the log line it lands in."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


def _check_text(value: str, what: str, limit: int) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode text (it holds a lone surrogate such as \\ud800)") from None
    return value


_GPU_NAMES = sorted({n for g in GPUS for n in (g.name, *g.aliases)})


class Resources(_Strict):
    model_config = ConfigDict(json_schema_extra={
        # gpu_count = 0 is a CPU-only job: it cannot also ask for a GPU model or GPU memory
        "if": {"properties": {"gpu_count": {"const": 0}}, "required": ["gpu_count"]},
        "then": {"properties": {"gpu": {"type": "null"}, "min_vram_gb": {"type": "null"}}},
    })

    gpu: list[Annotated[str, Field(json_schema_extra={"enum": _GPU_NAMES})]] | None = Field(
        default=None, min_length=1, max_length=32,
        description="Accepted GPU models (any of them), e.g. ['H100', 'A100-80GB']."
    )
    min_vram_gb: Annotated[int, Field(ge=1, le=4096), BeforeValidator(_a_json_number)] | None = None
    gpu_count: StrictInt = Field(default=1, ge=0, le=16)
    min_vcpu: StrictInt = Field(default=0, ge=0, le=1024)
    min_memory_gb: StrictInt = Field(default=0, ge=0, le=16384)
    disk_gb: StrictInt = Field(default=20, ge=1, le=65536)
    min_cuda: str | None = Field(
        default=None, json_schema_extra={"pattern": r"^[0-9]{1,2}\.[0-9]{1,2}$"},
        description="Oldest CUDA version the host's driver must support, e.g. '12.4'.")

    @field_validator("min_cuda")
    @classmethod
    def _cuda(cls, value: str | None) -> str | None:
        if value is not None and not _CUDA_RE.fullmatch(value):
            raise ValueError(f"min_cuda must be a CUDA version such as '12.4', not {_shown(value)}")
        return value

    @field_validator("gpu")
    @classmethod
    def _known_gpus(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("gpu must list at least one model, or be left out")
        out = []
        for name in value:
            gpu = canonical_gpu(name)
            if gpu is None:
                raise ValueError(f"unknown GPU model {_shown(name)}; see `gpuhop gpus` for the known names")
            out.append(gpu.name)
        return out

    @model_validator(mode="after")
    def _cpu_only_has_no_gpu(self) -> Resources:
        if self.gpu_count == 0 and (self.gpu or self.min_vram_gb):
            raise ValueError("gpu_count = 0 (a CPU-only job) cannot also ask for gpu or min_vram_gb")
        return self


_REGION_SCHEMA: dict[str, JsonValue] = {"pattern": "^" + _REGION_RE.pattern + "$"}


class Placement(_Strict):
    capacity: CapacityPreference = CapacityPreference.AUTO
    max_price_per_hour: PricePerHour | None = None
    providers: list[Annotated[str, Field(json_schema_extra=_REGION_SCHEMA)]] | None = Field(
        default=None, min_length=1, max_length=64)
    regions: list[Annotated[str, Field(json_schema_extra=_REGION_SCHEMA)]] | None = Field(
        default=None, min_length=1, max_length=64)

    @field_validator("providers", "regions")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one entry, or be left out")
        for item in value:
            if not _REGION_RE.fullmatch(item):
                raise ValueError(f"{_shown(item)} is not a valid name (letters, digits, . _ -)")
        return value


_NAME_SCHEMA: dict[str, JsonValue] = {"pattern": "^" + _NAME_RE.pattern + "$"}
# absolute, no '..' segment, only these characters
_MOUNT_SCHEMA: dict[str, JsonValue] = {"pattern": r"^(?!(.*/)?\.\.(/|$))/[A-Za-z0-9/._-]*$", "maxLength": 255}


class VolumeSpec(_Strict):
    name: str = Field(json_schema_extra=_NAME_SCHEMA)
    size_gb: StrictInt = Field(default=20, ge=1, le=65536)
    mount_path: str = Field(default="/workspace", json_schema_extra=_MOUNT_SCHEMA)
    sync: Literal["none", "object-store"] = Field(
        default="none",
        description="'object-store': the volume's content is checkpointed to the daemon's [storage] "
        "bucket and restored on each attempt, so the job may move to another data center or provider; "
        "'none': the volume stays where it was made and the job waits for capacity there.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("volume name must be 1-63 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("mount_path")
    @classmethod
    def _mount(cls, value: str) -> str:
        if not value.startswith("/") or ".." in value.split("/") or len(value) > 255:
            raise ValueError("mount_path must be an absolute path without '..'")
        if not _MOUNT_RE.fullmatch(value):
            raise ValueError("mount_path may only contain letters, digits, '/', '.', '_' or '-'")
        return value


class Policy(_Strict):
    max_relaunches: StrictInt = Field(default=10, ge=0, le=1000, description="after preemption or loss")
    max_retries_on_error: StrictInt = Field(default=0, ge=0, le=100, description="after a non-zero exit")
    max_cost_usd: CostUsd | None = None
    checkpoint_interval: PositiveFloat = Field(default=600, le=7 * 86400, description="seconds")


# what the document promises for free text: no NUL (lone surrogates cannot be written in UTF-8)
_TEXT = r"^[^\x00]*$"
_ENV_KEY_SCHEMA: dict[str, JsonValue] = {"pattern": r"^(?![Gg][Pp][Uu][Hh][Oo][Pp]_)" + _ENV_KEY_RE.pattern + "$"}


class JobSpec(_Strict):
    """What a user submits. Validated completely before anything is stored."""

    model_config = ConfigDict(json_schema_extra={"propertyNames": {"maxLength": 64}})

    name: str = Field(json_schema_extra=_NAME_SCHEMA)
    image: str = Field(default="python:3.11-slim", json_schema_extra={"pattern": "^" + _IMAGE_RE.pattern + "$"})
    command: list[Annotated[str, Field(max_length=MAX_COMMAND_ARG, json_schema_extra={"pattern": _TEXT})]] = Field(
        min_length=1, max_length=4096, json_schema_extra={"prefixItems": [  # the program: not empty
            {"type": "string", "minLength": 1, "maxLength": MAX_COMMAND_ARG, "pattern": _TEXT}]})
    env: dict[
        Annotated[str, Field(json_schema_extra=_ENV_KEY_SCHEMA)],
        Annotated[str, Field(max_length=MAX_ENV_VALUE, json_schema_extra={"pattern": _TEXT})],
    ] = Field(default_factory=dict, max_length=256, json_schema_extra={"additionalProperties": False})
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement)
    volume: VolumeSpec | None = None
    policy: Policy = Field(default_factory=Policy)
    workdir_sha256: str | None = Field(
        default=None, json_schema_extra={"pattern": "^[0-9a-f]{64}$"},
        description="The job's working directory: the sha256 of a tar.gz uploaded first with "
        "PUT /v1/workdirs/{sha256} (`gpuhop submit` does it for `workdir = \".\"`). The agent unpacks it "
        "into a fresh directory on every attempt and runs the command there.")

    @field_validator("workdir_sha256")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_RE.fullmatch(value):
            raise ValueError("workdir_sha256 must be 64 lowercase hex digits (a sha256)")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("name must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not _IMAGE_RE.fullmatch(value):
            raise ValueError("image must be a container image reference such as 'python:3.11-slim'")
        return value

    @field_validator("command", mode="before")
    @classmethod
    def _command_text(cls, value: object) -> object:
        # before pydantic's own checks, so that a lone surrogate is named as such
        if isinstance(value, list):
            for arg in value:
                if isinstance(arg, str):
                    _check_text(arg, "a command argument", MAX_COMMAND_ARG)
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the command's first element (the program) must not be empty")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        if len(value) > 256:
            raise ValueError("at most 256 environment variables")
        for key, val in value.items():
            if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"environment variable name {_shown(str(key))} is not a valid name")
            if key.upper().startswith(RESERVED_ENV_PREFIX):
                raise ValueError(f"environment variable {key!r}: names starting with GPUHOP_ are set by gpuhop")
            if isinstance(val, str):
                _check_text(val, f"the value of {key}", MAX_ENV_VALUE)
        return value


# --------------------------------------------------------------------------- provider side


@dataclass(frozen=True)
class Offer:
    """One thing a provider will rent: a machine shape at a price in one place."""

    provider: str
    offer_id: str  # provider-specific handle the adapter understands at launch time
    region: str  # data center / availability zone / region / machine, where volumes live
    gpu: str | None  # canonical GPU name, None for a CPU-only offer
    gpu_count: int
    vram_gb: int  # per GPU
    vcpu: int
    memory_gb: int
    disk_gb: int
    capacity: CapacityType
    price_per_hour: float  # USD for the whole machine shape (all of gpu_count)
    available: int = 1  # how many more the provider says it can start (best effort)
    supports_volumes: bool = True
    # newest CUDA the host's driver supports, when the provider says (None: unknown, or chosen
    # at launch, as RunPod does with minCudaVersion)
    max_cuda: str | None = None


@dataclass(frozen=True)
class ProviderVolume:
    provider: str
    volume_id: str
    name: str
    region: str
    size_gb: int


@dataclass(frozen=True)
class LaunchRequest:
    """Everything an adapter needs to start one attempt. `name` is deterministic
    (`<prefix>-<job>-<attempt>`): a launch retried with the same name must find the instance it
    already made instead of making another."""

    name: str
    idempotency_key: str  # name + offer: safe as a client token (same key = same parameters)
    job_id: str
    attempt: int
    offer: Offer
    image: str
    command: list[str]
    env: dict[str, str]  # the job's env plus the GPUHOP_* contract variables
    disk_gb: int
    volume: ProviderVolume | None = None
    mount_path: str = "/workspace"
    bid_price_per_hour: float | None = None  # for spot markets that take a bid
    min_cuda: str | None = None  # the job's [resources] min_cuda: adapters that can filter hosts send it


@dataclass(frozen=True)
class Bill:
    """What the provider charges for one machine, from the provider's own times and rules
    (RunPod: per second while the pod exists and runs; EC2: per second from the launch with
    a 60 s minimum, at the spot price in force). `ended_at` None means it is still billing.
    Adapters build it; the engine records it as the attempt's cost and makes it final once
    the termination is confirmed."""

    started_at: float  # UNIX seconds, when billing began (provider's clock)
    ended_at: float | None  # when billing stopped; None while it still runs
    cost_usd: float  # the charge for [started_at, ended_at or the time of the reading]


@dataclass
class Instance:
    """An instance as observed, normalized by its adapter."""

    provider: str
    instance_id: str
    name: str
    state: InstanceState
    region: str = ""
    price_per_hour: float | None = None
    exit_code: int | None = None  # when the job's process ended and the code is known
    exit_signal: int | None = None  # killed by this signal (not one gpuhop sent)
    stopped_by_us: bool = False  # ended because gpuhop asked it to
    reason: str = ""  # the provider's own words (StateReason, lastStatusChange, ...)
    interruption_at: datetime | None = None  # a pending reclaim notice, when known
    bill: Bill | None = None  # the provider's charge so far, when the adapter can tell it
    fault: InstanceFault | None = None  # the provider ended it for this reason (see InstanceFault)
    extra: dict[str, str] = field(default_factory=dict)


def cuda_tuple(version: str) -> tuple[int, ...]:
    """'12.4' -> (12, 4), for comparing CUDA versions."""
    return tuple(int(part) for part in version.split("."))


def attempt_name(prefix: str, job_id: str, attempt: int) -> str:
    return f"{prefix}-{job_id}-{attempt}"


def parse_attempt_name(prefix: str, name: str) -> tuple[str, int] | None:
    """Inverse of attempt_name; None for a name that is not ours."""
    m = re.fullmatch(rf"{re.escape(prefix)}-([a-z0-9]+)-(\d+)", name or "")
    if not m:
        return None
    return m.group(1), int(m.group(2))
