"""This daemon as one replica among several sharing a database (see store.leases for the rules).

It registers the replica's lease at start, renews it every third of its TTL, claims the jobs
of replicas whose lease expired (checked every `claim_interval_seconds`), and keeps the list of
live replicas: their URLs are given to agents so a report reaches a live replica when the one
that launched the machine is gone, and the lowest live id is the leader, the one replica that
does the housekeeping that must not run twice (reaping machines of ended jobs, deleting unused
volumes). A single daemon is a cluster of one: the same code, always on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.observation import describe
from orchestrator.store import Fence, LeaseLost, Store

log = logging.getLogger("gpuhop.cluster")

FORGET_REPLICAS_AFTER_SECONDS = 86400.0  # a replica gone this long (and owning nothing) is forgotten
PRUNE_EVERY_SECONDS = 3600.0


def default_replica_id(state_dir: Path) -> str:
    """Stable across restarts of one daemon (so it takes its own jobs back at once), distinct
    for two daemons on one host (their state dirs differ)."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(str(state_dir.expanduser().resolve()).encode()).hexdigest()[:8]
    return f"{host}-{digest}"


class Cluster:
    def __init__(self, store: Store, replica_id: str, url: str, ttl: float, claim_interval: float,
                 on_claim: Callable[[], None] = lambda: None,
                 on_refresh: Callable[[Cluster], None] = lambda cluster: None,
                 host_bound: frozenset[str] = frozenset()) -> None:
        self.store = store
        self.replica_id = replica_id
        self.url = url
        self.ttl = ttl
        self.claim_interval = claim_interval
        self.on_claim = on_claim
        self.on_refresh = on_refresh  # told after each look at the live replicas
        self.host_bound = host_bound  # providers whose machines only their own replica sees (local)
        self.fence: Fence | None = None
        self.leader = False
        self.peer_urls: list[str] = []  # the other live replicas' API URLs
        self._renewed_at = 0.0
        self._pruned_at = float("-inf")

    async def start(self) -> Fence:
        """Register (a new epoch) and fence the store's engine writes with it."""
        self.fence = await self.store.run(self.store.register_replica, self.replica_id, self.url, self.ttl)
        self.store.fence = self.fence
        self._renewed_at = time.monotonic()
        await self._refresh()
        log.info("replica %s registered (epoch %d, lease %g s)", self.replica_id, self.fence.epoch, self.ttl)
        return self.fence

    async def run(self, stop: asyncio.Event, fatal: Callable[[str], None]) -> None:
        """Renew, claim and look around until `stop`; `fatal` is called if another process
        registered under this replica's id (two daemons must not share one)."""
        while not stop.is_set():
            try:
                await self.step(fatal)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: the lease runs on; try again
                log.warning("replica %s: lease upkeep failed: %s", self.replica_id, describe(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.claim_interval)

    async def step(self, fatal: Callable[[str], None] = lambda why: None) -> None:
        fence = self.fence
        if fence is None:
            return
        if time.monotonic() - self._renewed_at >= self.ttl / 3:
            if await self.store.run(self.store.renew_replica, fence, self.ttl):
                self._renewed_at = time.monotonic()
            else:
                row = next((r for r in await self.store.run(self.store.replicas) if r.id == self.replica_id), None)
                if row is not None and row.epoch != fence.epoch:
                    fatal(f"another daemon registered as replica {self.replica_id} (epoch {row.epoch}); "
                          "give each replica its own [cluster] replica_id or state dir")
                    return
                # our lease ran out (a stall, the database away): jobs not yet claimed by others
                # are still ours; a new epoch fences whatever the old one had in flight
                log.warning("replica %s: lease had expired; registering again", self.replica_id)
                await self.start()
                return
        try:
            claimed = await self.store.run(self.store.claim_jobs, fence, host_bound=self.host_bound)
        except LeaseLost:
            self._renewed_at = 0.0  # renew (or re-register) on the next step
            return
        if self.leader and time.monotonic() - self._pruned_at > PRUNE_EVERY_SECONDS:
            self._pruned_at = time.monotonic()
            await self.store.run(self.store.prune_replicas, FORGET_REPLICAS_AFTER_SECONDS)
        if claimed:
            log.info("replica %s took over %d job(s) whose owner's lease expired", self.replica_id, len(claimed))
            self.on_claim()
        await self._refresh()

    async def _refresh(self) -> None:
        now = time.time()
        live = [r for r in await self.store.run(self.store.replicas) if r.expires_at > now]
        self.leader = bool(live) and min(r.id for r in live) == self.replica_id
        self.peer_urls = [r.url for r in live if r.id != self.replica_id and r.url]
        self.on_refresh(self)

    async def retire(self) -> None:
        """A clean stop: hand the jobs over now rather than after the lease runs out."""
        if self.fence is not None:
            with contextlib.suppress(Exception):
                await self.store.run(self.store.retire_replica, self.fence)
