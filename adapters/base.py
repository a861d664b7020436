"""The one interface every provider implements, the optional abilities some have, and the
errors that tell the engine what to do next.

The engine talks to providers only through `Adapter`. Its contract, which every adapter keeps:

* `offers()` returns what can be rented now, normalized (canonical GPU names, USD per hour for
  the whole shape). It may be cached by the adapter for a few seconds.
* `launch(req)` is idempotent by `req.name`: if an instance with that name already exists it is
  returned instead of making a second one. It raises `NoCapacity` when the offer cannot be had
  (the engine tries the next offer), `RetryLater` for throttling and transient faults, and
  `PermanentError` for requests the provider will never accept.
* `list_instances()` is ONE batched listing (per provider, not per job) of every instance whose
  name starts with the daemon's prefix, including ones that ended but still exist.
* `terminate(instance_id)` is idempotent: an instance that is already gone is success. It
  returns once the provider confirms that billing stopped, with the final `Bill` when the
  provider can still tell it (None when it cannot: the engine keeps its own estimate).
* No call outlives its caller: an adapter never leaves a request running in an abandoned
  thread. Use native async HTTP with real timeouts, or await a thread to its end (the
  engine never wraps adapter calls in `asyncio.wait_for` around threads).
* `list_instances()` returns EVERY instance it sees, one per provider instance id, even when
  two carry one name (a duplicate launch): the engine terminates the extra one.

Optional abilities are mixins: `VolumeSupport` (network volumes that outlive instances) and
`LogSupport` (the adapter can read a job's output itself, as the local one does).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from orchestrator.models import Bill, Instance, LaunchRequest, Offer, ProviderVolume


class AdapterError(Exception):
    """Base of every error an adapter raises. Messages never contain secrets."""

    def __init__(self, message: str, *, provider: str = "") -> None:
        super().__init__(message)
        self.provider = provider


class RetryLater(AdapterError):
    """A transient fault (throttled, 5xx, timeout): the same call may work after `delay` s."""

    def __init__(self, message: str, *, provider: str = "", delay: float = 5.0) -> None:
        super().__init__(message, provider=provider)
        self.delay = delay


class NoCapacity(AdapterError):
    """This offer cannot be had now: try another offer, or this one again later."""


class PermanentError(AdapterError):
    """The provider will never accept this request (bad input, unknown type, quota)."""


class AuthError(PermanentError):
    """The credentials were refused. Fix the configuration."""


@dataclass
class AdapterContext:
    """What the daemon hands every adapter at construction."""

    prefix: str  # instance names start with f"{prefix}-"
    state_dir: Path  # the adapter may keep files under state_dir / <provider name>
    logs_dir: Path  # where job output is kept: logs_dir / f"{attempt name}.log"
    public_url: str  # where an agent on a machine reaches the daemon (agent reports)
    extra: dict[str, Any] = field(default_factory=dict)


class Adapter(abc.ABC):
    """A provider. Subclasses set `name`, `Settings` (a pydantic model with extra="forbid" for
    its `[providers.<name>]` table) and implement the four verbs. Constructed as
    `cls(cls.Settings.model_validate(table), ctx)` by the registry."""

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    # preemption notice the provider gives, seconds (0 = none); used in placement only
    notice_seconds: ClassVar[float] = 0.0
    # the daemon cannot see this provider's processes: the job agent reports for them (start,
    # heartbeats, exit), and a silent agent means a lost machine
    remote: ClassVar[bool] = True

    def __init__(self, settings: Any, ctx: AdapterContext) -> None:
        self.settings = settings
        self.ctx = ctx

    @abc.abstractmethod
    async def offers(self) -> list[Offer]:
        """Every offer available now. Raises RetryLater when the provider cannot be read."""

    @abc.abstractmethod
    async def launch(self, req: LaunchRequest) -> Instance:
        """Start `req`, idempotently by `req.name`. Returns the instance (maybe still pending)."""

    @abc.abstractmethod
    async def list_instances(self) -> list[Instance]:
        """One batched listing of every instance named with the daemon's prefix."""

    @abc.abstractmethod
    async def terminate(self, instance_id: str) -> Bill | None:
        """Stop and delete the instance; billing stops. Already gone is success. Returns the
        final bill when the provider can still tell it."""

    async def verify(self) -> str:
        """One cheap read-only call that proves the credentials work (`gpuhop check-config`).
        Returns a short description of what was read ("account ok, 12 GPU types"); raises
        AuthError for refused credentials and AdapterError for anything else. Needs no start()."""
        return "no credentials to check"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Called once when the daemon starts (open sessions, create queues)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Called once when the daemon stops. Must not touch running instances."""


class VolumeSupport(abc.ABC):
    """Network volumes that outlive instances and live in one region."""

    @abc.abstractmethod
    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        """Create the volume in `region`, or return the one that already has this name there."""

    @abc.abstractmethod
    async def delete_volume(self, volume_id: str) -> None:
        """Delete the volume. Already gone is success."""

    def storage_usd_per_month(self, size_gb: int) -> float:
        """What a volume of `size_gb` costs per month while it exists, job or no job (0: free)."""
        return 0.0


class LogSupport(abc.ABC):
    """The adapter can read a job's output for an instance without the agent's help."""

    @abc.abstractmethod
    def log_path(self, instance_name: str) -> Path | None:
        """Path of the output file of the named instance, if there is one on this machine."""


@dataclass(frozen=True)
class Interruption:
    """A provider's notice that it will take an instance back soon."""

    instance_id: str
    action: str  # "terminate", "stop", "hibernate"
    deadline: datetime  # when the provider will take it (UTC)
    received: datetime


class InterruptionSupport(abc.ABC):
    """The provider announces reclaims ahead of time (AWS: 2-minute warning over EventBridge)."""

    @abc.abstractmethod
    async def poll_interruptions(self, wait_seconds: float) -> list[Interruption]:
        """Long-poll for notices; returns [] after `wait_seconds` when there are none.
        Each notice is returned once (acknowledged after it is returned)."""


AdapterFactory = Callable[[dict[str, Any], AdapterContext], Adapter]
