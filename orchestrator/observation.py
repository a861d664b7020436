"""What the providers show, gathered beside the tick rather than inside it.

It exists because a slow or failing provider must never stall the reconcile loop (a RunPod
listing delayed 10 s, or 50% of calls failing, used to stretch ticks to minutes and make
`/healthz` answer 503). Each provider has at most one listing in flight, run as its own task
and awaited to its end (no call outlives its caller); a tick asks for fresh listings, waits a
short bounded time, and uses those that were asked for after the previous tick began. A
provider whose listing is late is simply "not readable" this tick: the decisions wait for it.

It also keeps each provider's health, its offers cache (refreshed in the background the same
way) and the start-up of providers that failed to start (retried with backoff while the others
run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from adapters.base import Adapter
from orchestrator import metrics
from orchestrator.models import Instance, InstanceState, Offer
from orchestrator.offer_index import OfferIndex

log = logging.getLogger("gpuhop.engine")


@dataclass
class ProviderHealth:
    ok: bool = True
    error: str = ""
    since: float = 0.0
    last_ok: float = 0.0
    started: bool = False  # start() succeeded; until then the provider is degraded
    suspended_until: float = 0.0  # no launches before this (the account was refused)
    suspended_why: str = ""


@dataclass
class Listing:
    """One provider's answer: every instance it showed, and when the listing was asked for."""

    asked_at: float
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Snapshot:
    """The providers' view for one tick."""

    by_name: dict[str, list[Instance]]  # every instance of ours, grouped by name
    readable: set[str]  # providers whose fresh listing succeeded
    asked_at: dict[str, float]  # provider -> when its listing was asked for


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:300]


class Observer:
    def __init__(self, adapters: dict[str, Adapter], prefix: str, *, offer_max_age: float,
                 start_backoff_max: float) -> None:
        self.adapters = adapters
        self.prefix = prefix
        self.offer_max_age = offer_max_age
        self.start_backoff_max = start_backoff_max
        self.health: dict[str, ProviderHealth] = {name: ProviderHealth() for name in adapters}
        self._listing_tasks: dict[str, asyncio.Task[Listing]] = {}
        self._latest: dict[str, Listing] = {}
        self._used: dict[str, float] = {}  # provider -> when the newest listing a snapshot used was asked for
        self._failed_at: dict[str, float] = {}
        self._offers: dict[str, list[Offer]] = {name: [] for name in adapters}
        self._offers_at: dict[str, float] = dict.fromkeys(adapters, 0.0)
        self._offer_tasks: dict[str, asyncio.Task[None]] = {}
        self._start_tasks: dict[str, asyncio.Task[None]] = {}
        self._tried: set[str] = set()  # providers whose start was tried at least once
        self._all_tried = asyncio.Event()  # set once every provider's start was tried
        self._index: OfferIndex | None = None
        self._index_key: tuple[tuple[str, int], ...] = ()
        self._index_lists: list[list[Offer]] = []
        self._index_lock = asyncio.Lock()
        # told of every fresh offer list (the capacity-gap history, orchestrator/relocation.py)
        self.on_offers: Callable[[str, list[Offer]], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ provider start-up

    def start_providers(self) -> None:
        """Start every provider in the background; one that fails is degraded and retried."""
        for name in self.adapters:
            if name not in self._start_tasks:
                self._start_tasks[name] = asyncio.create_task(self._start(name), name=f"start-{name}")

    async def _start(self, name: str) -> None:
        adapter = self.adapters[name]
        delay = min(1.0, self.start_backoff_max)
        while True:
            try:
                await adapter.start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._tried.add(name)
                self._note_tried()
                self._degrade(name, f"could not start: {describe(exc)}", "start")
                log.warning("provider %s could not start (retrying in %.1f s): %s", name, delay, describe(exc))
                await asyncio.sleep(delay)
                delay = min(self.start_backoff_max, delay * 2)
                continue
            self._tried.add(name)
            self._note_tried()
            h = self.health[name]
            h.started = True
            h.ok, h.error, h.last_ok = True, "", time.time()
            log.info("provider %s started", name)
            return

    async def wait_started(self, seconds: float) -> None:
        """Give the providers' start-up a moment (the first tick after a start)."""
        pending = [t for t in self._start_tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=seconds)

    def _note_tried(self) -> None:
        if self.settled():
            self._all_tried.set()

    def settled(self) -> bool:
        """Every provider has started or failed its first try: placement may compare them all
        (before that, a job would land on whichever provider happened to start first)."""
        return len(self._tried) == len(self.adapters)

    def started(self, name: str) -> bool:
        return self.health[name].started

    def launchable(self, name: str, now: float | None = None) -> bool:
        """Started, and not suspended for the account: its offers may be placed on."""
        h = self.health[name]
        if not h.started:
            return False
        if h.suspended_until and (now if now is not None else time.time()) >= h.suspended_until:
            h.suspended_until, h.suspended_why = 0.0, ""
            metrics.PROVIDER_SUSPENDED.labels(name).set(0)
            log.info("provider %s: launch suspension over", name)
        return not h.suspended_until

    def suspend(self, name: str, why: str, seconds: float) -> bool:
        """No launches on `name` for `seconds`. Returns False when it already was suspended."""
        h = self.health[name]
        fresh = not h.suspended_until
        h.suspended_until = max(h.suspended_until, time.time() + seconds)
        h.suspended_why = why
        if fresh:
            log.warning("provider %s suspended for launches for %.0f s: %s", name, seconds, why)
            metrics.PROVIDER_SUSPENSIONS.labels(name).inc()
            metrics.PROVIDER_SUSPENDED.labels(name).set(1)
        return fresh

    async def close(self) -> None:
        tasks = [*self._start_tasks.values(), *self._listing_tasks.values(), *self._offer_tasks.values()]
        for task in self._start_tasks.values():
            task.cancel()
        # listings and offer reads are reads: let them end (each adapter bounds its own time)
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ health

    def _degrade(self, name: str, error: str, call: str) -> None:
        h = self.health[name]
        if h.ok:
            h.since = time.time()
            log.warning("provider %s degraded: %s", name, error)
        h.ok, h.error = False, error
        metrics.PROVIDER_ERRORS.labels(name, call).inc()
        metrics.PROVIDER_UP.labels(name).set(0)

    def _recover(self, name: str) -> None:
        h = self.health[name]
        if not h.ok:
            log.info("provider %s recovered", name)
        h.ok, h.error, h.last_ok = True, "", time.time()
        metrics.PROVIDER_UP.labels(name).set(1)

    # ------------------------------------------------------------------ listings

    async def _list(self, name: str) -> Listing:
        listing = Listing(asked_at=time.time())
        try:
            instances = await self.adapters[name].list_instances()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed_at[name] = listing.asked_at
            self._degrade(name, describe(exc), "list")
            raise
        self._recover(name)
        listing.instances = [i for i in instances if i.name.startswith(f"{self.prefix}-")]
        self._latest[name] = listing
        return listing

    async def snapshot(self, fresh_after: float, wait: float) -> Snapshot:
        """Ask every started provider for a listing (unless one is in flight), wait up to `wait`
        seconds, and return the listings asked for at or after `fresh_after`, or not used by a
        snapshot before. (Only the first: a listing slower than the gap between two ticks was
        never used, and a provider that always answered that slowly was never seen at all; the
        fault storm's AWS latency scenario left every job launching for good. What was asked
        before an attempt was recorded or launched does not judge it: reconcile's `asked_at`.)"""
        for name in self.adapters:
            if not self.started(name):
                continue
            task = self._listing_tasks.get(name)
            if task is None or task.done():
                task = asyncio.create_task(self._list(name), name=f"list-{name}")
                task.add_done_callback(_consume)
                self._listing_tasks[name] = task
        pending = [t for t in self._listing_tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait)
        by_name: dict[str, list[Instance]] = {}
        readable: set[str] = set()
        asked_at: dict[str, float] = {}
        for name in self.adapters:
            listing = self._latest.get(name)
            if listing is None or (listing.asked_at < fresh_after and listing.asked_at <= self._used.get(name, -1.0)):
                continue
            if self._failed_at.get(name, 0.0) > listing.asked_at:
                continue  # a newer listing failed: what this one says may be out of date
            readable.add(name)
            asked_at[name] = self._used[name] = listing.asked_at
            for inst in listing.instances:
                by_name.setdefault(inst.name, []).append(inst)
        return Snapshot(by_name, readable, asked_at)

    # ------------------------------------------------------------------ offers

    async def _refresh_offers(self, name: str) -> None:
        try:
            offers = await self.adapters[name].offers()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.PROVIDER_ERRORS.labels(name, "offers").inc()
            log.warning("offers from %s unavailable: %s", name, describe(exc))
            return
        self._offers[name] = offers
        self._offers_at[name] = time.time()
        if self.on_offers is not None:
            try:
                await self.on_offers(name, offers)
            except Exception as exc:  # history is for decisions later: never fail a refresh for it
                log.warning("recording %s's capacity failed: %s", name, describe(exc))

    async def offer_index(self, names: list[str]) -> OfferIndex:
        """The current offers of `names` as one OfferIndex, rebuilt only when one of their
        offer lists was refreshed since (a 100k-offer catalogue takes a fraction of a second
        of CPU to index: that is done in a thread, once per refresh, not once per launch)."""
        key = tuple((name, id(self._offers.get(name))) for name in sorted(names))
        async with self._index_lock:
            if self._index is None or key != self._index_key:
                lists = [self._offers.get(name, []) for name, _ in key]
                flat = [offer for offers in lists for offer in offers]
                self._index = await asyncio.to_thread(OfferIndex.build, flat)
                self._index_key, self._index_lists = key, lists  # the lists are kept: ids stay theirs
            return self._index

    def known_offers(self) -> dict[str, list[Offer]]:
        """The offers each provider last gave, without asking again; a provider that has not
        answered yet is absent (nothing is known of it)."""
        return {name: list(offers) for name, offers in self._offers.items() if self._offers_at[name] > 0 or offers}

    def next_offers_in(self, names: list[str]) -> float:
        """Seconds until the offers of one of `names` are read again (0: due now): before then,
        a placement on the same offers finds the same nothing."""
        if not names:
            return 0.0
        now = time.time()
        return max(0.0, min(self._offers_at.get(name, 0.0) + self.offer_max_age - now for name in names))

    def invalidate_offers(self, name: str) -> None:
        """The provider's offers are wrong (a launch found no capacity): the next caller waits
        for fresh ones."""
        self._offers_at[name] = 0.0

    def refresh_offers_soon(self, name: str) -> None:
        """The provider's offers are getting stale (a launch took some of its capacity): fetch
        them again in the background, while launches go on with the ones in hand (one that
        finds no capacity tries its next candidate). A hundred relaunches at once waited for a
        refresh and an index rebuild each (issue 9: detection to launch)."""
        task = self._offer_tasks.get(name)
        if self.started(name) and (task is None or task.done()):
            self._offer_tasks[name] = asyncio.create_task(self._refresh_offers(name), name=f"offers-{name}")

    async def offers(self, max_age: float | None = None, wait: float = 30.0) -> dict[str, list[Offer]]:
        """Every started provider's offers, refreshed when older than `max_age`. Waits at most
        `wait` seconds for refreshes; a slower one finishes in the background and serves the
        next caller."""
        max_age = self.offer_max_age if max_age is None else max_age
        deadline = time.monotonic() + wait
        # right after start-up, a provider still starting would be missing from the answer
        # (`gpuhop offers` listed RunPod alone while the local provider started under load):
        # wait, within the same budget, until each has started or failed its first try
        if not self.settled() and self._start_tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_tried.wait(), wait)
        wait = max(0.0, deadline - time.monotonic())
        now = time.time()
        waiting: list[asyncio.Task[None]] = []
        for name in self.adapters:
            if not self.started(name) or now - self._offers_at[name] < max_age:
                continue
            task = self._offer_tasks.get(name)
            if task is None or task.done():
                task = asyncio.create_task(self._refresh_offers(name), name=f"offers-{name}")
                self._offer_tasks[name] = task
            waiting.append(task)
        if waiting:
            await asyncio.wait(waiting, timeout=wait)
        return {n: list(o) for n, o in self._offers.items()}


def _consume(task: asyncio.Task[Listing]) -> None:
    """A failed listing was already logged and counted; keep asyncio from warning about it."""
    if not task.cancelled():
        task.exception()


def pick_primary(instances: list[Instance], known_id: str | None) -> tuple[Instance | None, list[Instance]]:
    """Of the instances carrying one attempt's name, the one that is the attempt's (its recorded
    id, else the oldest live one by id order) and the live extras (duplicates to terminate).
    Pure."""
    if not instances:
        return None, []
    live = [i for i in instances if i.state != InstanceState.TERMINATED]
    if known_id is not None:
        # the attempt knows its machine: any other one with its name is an extra, even when
        # its own machine is no longer listed
        primary = next((i for i in instances if i.instance_id == known_id), None)
        return primary, [i for i in live if i.instance_id != known_id]
    ranked = sorted(live, key=lambda i: ((i.bill.started_at if i.bill else 0.0), i.instance_id))
    if not ranked:
        return instances[-1], []
    return ranked[0], ranked[1:]
