"""An in-process provider for driving the Engine by hand: a real `adapters.base.Adapter` and
`VolumeSupport` that keeps its instances in memory, with the knobs a test needs to make it
misbehave the way real providers do, and a ledger of what it created, stopped and billed.

Why it exists: the end-to-end tests exercise the engine through real daemons and simulators, but
they cannot say "exactly this tick, the launch succeeded at the provider and then the answer was
lost" or "this instance is an orphan". This fake keeps the adapter contract (adapters/base.py)
so that the engine cannot tell it from a real provider:

* `launch` is idempotent by name: a live instance with the request's name is returned, not a
  second one; `NoCapacity` when the region is full; `RetryLater` / `NoCapacity` / any
  `AdapterError` on demand, before the call has any effect or after (the launch happened, the
  answer was lost).
* `list_instances` returns EVERY instance, one per instance id, including ended ones and two
  that carry one name.
* `terminate` is idempotent and returns the final `Bill` (None for an id it never had).
* every call can be delayed with a real `asyncio.sleep`, so a caller that gives up cancels it.

Knobs: `capacity` and `prices` per region, `fail_next(verb, n, error, after=...)`,
`delays[verb]`, `add_instance` (an instance no launch of this daemon made), `preempt`,
`exit`, `fail` (a provider's fault: bad image, account, capacity), `boot`, `list_foreign` (the listing also shows machines that are not ours).
Observations: `ledger` (created / terminated, with bills), `requests` (every launch request),
`calls` (a count per verb).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from adapters.base import (
    Adapter,
    AdapterContext,
    AdapterError,
    NoCapacity,
    PermanentError,
    VolumeSupport,
)
from orchestrator.models import (
    Bill,
    CapacityType,
    Instance,
    InstanceFault,
    InstanceState,
    LaunchRequest,
    Offer,
    ProviderVolume,
)

VERBS = ("offers", "launch", "list", "terminate", "ensure_volume", "delete_volume")
GONE = (InstanceState.TERMINATED,)


class FakeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class FakeInstance:
    instance_id: str
    name: str
    region: str
    offer_id: str
    price_per_hour: float
    state: InstanceState
    created_at: float
    billing_ended_at: float | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    stopped_by_us: bool = False
    reason: str = ""
    volume_id: str | None = None
    fault: InstanceFault | None = None

    @property
    def live(self) -> bool:
        return self.state not in GONE


@dataclass(frozen=True)
class LedgerEntry:
    kind: str  # "created" or "terminated"
    instance_id: str
    name: str
    region: str
    bill: Bill | None = None


@dataclass
class _Fault:
    error: AdapterError
    after: bool  # raise after the call had its effect (the answer was lost), not before


@dataclass(eq=False, repr=False)
class FakeAdapter(Adapter, VolumeSupport):
    """See the module docstring. Construct with `FakeAdapter.create(tmp_path, ...)`."""

    name = "fake"
    Settings = FakeSettings
    remote = False  # the daemon sees the instances' states itself: no agent reports needed
    notice_seconds = 0.0

    ctx: AdapterContext
    capacity: dict[str, int] = field(default_factory=lambda: {"r1": 4})
    prices: dict[str, float] = field(default_factory=dict)  # region -> USD/h (default 1.0)
    gpu: str = "RTX-4090"
    capacity_type: CapacityType = CapacityType.ON_DEMAND
    start_state: InstanceState = InstanceState.RUNNING  # PENDING: call boot() to run it
    clock: Callable[[], float] = time.time
    delays: dict[str, float] = field(default_factory=dict)  # verb -> seconds every call waits
    list_foreign: bool = False  # a sloppy listing: also instances without the daemon's prefix

    instances: dict[str, FakeInstance] = field(default_factory=dict)
    volumes: dict[str, ProviderVolume] = field(default_factory=dict)
    ledger: list[LedgerEntry] = field(default_factory=list)
    requests: list[LaunchRequest] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    _faults: dict[str, deque[_Fault]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    # indexes, so a launch or an offer list does not scan 10,000 instances (bench/tick_scale.py
    # measures the daemon, not this double): instances by name, and live ones per region,
    # recounted only when an instance may have stopped being live or `instances` was edited
    _by_name: dict[str, list[FakeInstance]] = field(default_factory=dict)
    _ended: int = 0
    _created: int = 0
    _in_use_at: tuple[int, int, int] = (-1, -1, -1)
    _in_use_by_region: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        super().__init__(FakeSettings(), self.ctx)

    @classmethod
    def create(cls, root: Path, prefix: str = "gpuhop", **kwargs: Any) -> FakeAdapter:
        ctx = AdapterContext(prefix=prefix, state_dir=root / "state", logs_dir=root / "logs",
                             public_url="http://127.0.0.1:9")
        return cls(ctx=ctx, **kwargs)

    # ------------------------------------------------------------------ knobs

    def fail_next(self, verb: str, n: int = 1, error: type[AdapterError] | AdapterError = AdapterError,
                  *, after: bool = False) -> None:
        """The next `n` calls of `verb` raise `error`; with `after`, once the call took effect."""
        assert verb in VERBS, verb
        queue = self._faults.setdefault(verb, deque())
        for _ in range(n):
            exc = error if isinstance(error, AdapterError) else error(f"injected {verb} fault", provider=self.name)
            queue.append(_Fault(exc, after))

    def add_instance(self, name: str, region: str = "r1", state: InstanceState | None = None) -> str:
        """An instance this daemon's launches did not make (an orphan, a duplicate, a crash's
        leftover). Returns its id."""
        return self._create(name, region, f"{region}-{self.gpu}", None, state or self.start_state).instance_id

    def preempt(self, instance_id: str, reason: str = "reclaimed by the fake provider") -> None:
        inst = self.instances[instance_id]
        inst.state, inst.reason = InstanceState.PREEMPTED, reason
        inst.billing_ended_at = inst.billing_ended_at or self.clock()
        self._ended += 1  # no longer live: the per-region count is recounted

    def exit(self, instance_id: str, code: int | None = 0, signal: int | None = None) -> None:
        """The job's process ended (the machine itself keeps billing until terminated)."""
        inst = self.instances[instance_id]
        inst.state, inst.exit_code, inst.exit_signal = InstanceState.EXITED, code, signal
        self._ended += 1

    def fail(self, instance_id: str, fault: InstanceFault, reason: str,
             state: InstanceState = InstanceState.EXITED) -> None:
        """The provider ended the instance for a reason of its own (see InstanceFault)."""
        inst = self.instances[instance_id]
        inst.state, inst.fault, inst.reason = state, fault, reason
        self._ended += 1

    def forget(self) -> None:
        """Forget every machine and call so far (the provider's history ages out, as real
        ones' does): for long benchmarks."""
        self.instances.clear()
        self._by_name.clear()
        self.ledger.clear()
        self.requests.clear()
        self._ended += 1

    def boot(self, instance_id: str) -> None:
        inst = self.instances[instance_id]
        if inst.state == InstanceState.PENDING:
            inst.state = InstanceState.RUNNING

    # ------------------------------------------------------------------ observations

    def created(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.kind == "created"]

    def terminated(self) -> dict[str, Bill | None]:
        """instance id -> the bill its (first) termination returned."""
        out: dict[str, Bill | None] = {}
        for e in self.ledger:
            if e.kind == "terminated":
                out.setdefault(e.instance_id, e.bill)
        return out

    def live(self, name: str | None = None) -> list[FakeInstance]:
        if name is not None:
            return [i for i in self._by_name.get(name, ()) if i.live and self.instances.get(i.instance_id) is i]
        return [i for i in self.instances.values() if i.live]

    def bill(self, instance_id: str) -> Bill:
        inst = self.instances[instance_id]
        end = inst.billing_ended_at
        upto = end if end is not None else self.clock()
        cost = max(0.0, upto - inst.created_at) * inst.price_per_hour / 3600.0
        return Bill(started_at=inst.created_at, ended_at=end, cost_usd=round(cost, 9))

    # ------------------------------------------------------------------ the contract

    async def offers(self) -> list[Offer]:
        fault = await self._enter("offers")
        self._raise_before(fault)
        out = [
            Offer(provider=self.name, offer_id=f"{region}-{self.gpu}", region=region, gpu=self.gpu, gpu_count=1,
                  vram_gb=24, vcpu=8, memory_gb=32, disk_gb=0, capacity=self.capacity_type,
                  price_per_hour=self._price(region), available=max(0, cap - self._in_use(region)))
            for region, cap in sorted(self.capacity.items())
        ]
        self._raise_after(fault)
        return out

    async def launch(self, req: LaunchRequest) -> Instance:
        fault = await self._enter("launch")
        self._raise_before(fault)
        self.requests.append(req)
        existing = self.live(req.name)
        if existing:
            inst = existing[0]
        else:
            region = req.offer.region
            if region not in self.capacity:
                raise PermanentError(f"unknown region {region}", provider=self.name)
            if self._in_use(region) >= self.capacity[region]:
                raise NoCapacity(f"no capacity in {region}", provider=self.name)
            if req.volume is not None and req.volume.region != region:
                raise PermanentError(f"volume {req.volume.volume_id} is in {req.volume.region}, not {region}",
                                     provider=self.name)
            inst = self._create(req.name, region, req.offer.offer_id,
                                req.volume.volume_id if req.volume else None, self.start_state)
        self._raise_after(fault)
        return self._view(inst)

    async def list_instances(self) -> list[Instance]:
        fault = await self._enter("list")
        self._raise_before(fault)
        prefix = f"{self.ctx.prefix}-"
        out: list[Instance] = []
        for n, inst in enumerate(list(self.instances.values())):
            if self.list_foreign or inst.name.startswith(prefix):
                out.append(self._view(inst))
            if n % 1000 == 999:  # a real adapter parses its answer off the loop or in pieces:
                await asyncio.sleep(0)  # a 10,000-machine listing must not read as the tick's stall
        self._raise_after(fault)
        return out

    async def terminate(self, instance_id: str) -> Bill | None:
        fault = await self._enter("terminate")
        self._raise_before(fault)
        inst = self.instances.get(instance_id)
        if inst is None:
            self._raise_after(fault)
            return None
        if inst.live:
            inst.state, inst.stopped_by_us = InstanceState.TERMINATED, True
            self._ended += 1
            inst.billing_ended_at = inst.billing_ended_at or self.clock()
            self.ledger.append(LedgerEntry("terminated", inst.instance_id, inst.name, inst.region,
                                           self.bill(instance_id)))
        self._raise_after(fault)
        return self.bill(instance_id)

    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        fault = await self._enter("ensure_volume")
        self._raise_before(fault)
        vol = next((v for v in self.volumes.values() if v.name == name and v.region == region), None)
        if vol is None:
            vol = ProviderVolume(self.name, f"vol-{len(self.volumes) + 1}", name, region, size_gb)
            self.volumes[vol.volume_id] = vol
        self._raise_after(fault)
        return vol

    async def delete_volume(self, volume_id: str) -> None:
        fault = await self._enter("delete_volume")
        self._raise_before(fault)
        self.volumes.pop(volume_id, None)
        self._raise_after(fault)

    # ------------------------------------------------------------------ inside

    async def _enter(self, verb: str) -> _Fault | None:
        self.calls[verb] += 1
        delay = self.delays.get(verb, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)  # cancellable: a caller that gives up stops the call
        queue = self._faults.get(verb)
        return queue.popleft() if queue else None

    @staticmethod
    def _raise_before(fault: _Fault | None) -> None:
        if fault is not None and not fault.after:
            raise fault.error

    @staticmethod
    def _raise_after(fault: _Fault | None) -> None:
        if fault is not None and fault.after:
            raise fault.error

    def _price(self, region: str) -> float:
        return self.prices.get(region, 1.0)

    def _in_use(self, region: str) -> int:
        key = (len(self.instances), self._created, self._ended)
        if key != self._in_use_at:
            self._in_use_by_region = Counter(i.region for i in self.instances.values() if i.live)
            self._in_use_at = key
        return self._in_use_by_region[region]

    def _create(self, name: str, region: str, offer_id: str, volume_id: str | None,
                state: InstanceState) -> FakeInstance:
        inst = FakeInstance(
            instance_id=f"fake-{next(self._ids)}", name=name, region=region, offer_id=offer_id,
            price_per_hour=self._price(region), state=state, created_at=self.clock(), volume_id=volume_id,
        )
        counted = self._in_use_at == (len(self.instances), self._created, self._ended)
        self.instances[inst.instance_id] = inst
        self._by_name.setdefault(name, []).append(inst)
        self._created += 1
        if counted:  # keep the count current rather than recount 10,000 instances per launch
            self._in_use_by_region[region] += inst.live
            self._in_use_at = (len(self.instances), self._created, self._ended)
        self.ledger.append(LedgerEntry("created", inst.instance_id, name, region))
        return inst

    def _view(self, inst: FakeInstance) -> Instance:
        return Instance(
            provider=self.name, instance_id=inst.instance_id, name=inst.name, state=inst.state,
            region=inst.region, price_per_hour=inst.price_per_hour, exit_code=inst.exit_code,
            exit_signal=inst.exit_signal, stopped_by_us=inst.stopped_by_us, reason=inst.reason,
            bill=self.bill(inst.instance_id), extra={"offer_id": inst.offer_id}, fault=inst.fault,
        )


# --------------------------------------------------------------------------- driving an Engine


@dataclass(repr=False)
class Rig:
    """A real Engine on a real Store (SQLite) with one FakeAdapter, driven tick by tick."""

    engine: Any  # orchestrator.engine.Engine (imported lazily: this module is the adapter first)
    store: Any  # orchestrator.store.Store
    fake: FakeAdapter

    @classmethod
    def create(cls, root: Path, fake: FakeAdapter | None = None, store_url: str | None = None,
               **engine_settings: Any) -> Rig:
        from orchestrator.config import EngineSettings, ServerSettings, Settings
        from orchestrator.engine import Engine
        from orchestrator.store import Store

        fake = fake or FakeAdapter.create(root)
        knobs: dict[str, Any] = {
            "tick_seconds": 0.05, "launch_grace_seconds": 5.0, "provider_timeout_seconds": 20.0,
            "offer_refresh_seconds": 0.001, "retry_backoff_max_seconds": 0.05, "stop_grace_seconds": 0.0,
        }
        knobs.update(engine_settings)
        settings = Settings(server=ServerSettings(state_dir=root / "state", instance_prefix=fake.ctx.prefix),
                            engine=EngineSettings(**knobs), providers={fake.name: {}})
        store = Store(store_url or f"sqlite:///{root / 'gpuhop.db'}")
        store.migrate()
        engine = Engine(settings, store, {fake.name: fake}, lambda name: f"token-for-{name}")
        return cls(engine, store, fake)

    async def step(self) -> None:
        """One tick, then everything it started (launches, terminations) carried to its end."""
        await self.engine.tick()
        await self.engine.drain()

    async def until(self, check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        """Tick until `check()` is truthy; fail, showing the store and the fake, after `timeout` s
        (a deadline for a condition, generous: never a claim about speed)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.step()
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached within {timeout:.0f} s: {what}\n{self.describe()}")
            await asyncio.sleep(0.01)

    def describe(self) -> str:
        lines = []
        for job in self.store.list_jobs():
            lines.append(f"job {job.id} {job.status} {job.end_reason or ''} {job.message}")
            for a in self.store.attempts(job.id):
                lines.append(f"  attempt {a.number} {a.status} {a.end_reason or ''} {a.region} {a.instance_id}")
        lines += [f"instance {i.instance_id} {i.name} {i.state.value} {i.region}" for i in self.fake.instances.values()]
        lines += [f"ledger {e.kind} {e.instance_id} {e.name}" for e in self.fake.ledger]
        return "\n".join(lines)

    def close(self) -> None:
        self.store.close()
