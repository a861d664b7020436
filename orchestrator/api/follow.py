"""Bookkeeping for `logs?follow=true` streams, so an abandoned stream costs nothing.

A follower waits on an event that is set when output arrives (an agent's report appends to the
log in this process), when its client goes away, or when a slow timer fires (a local job writes
its log file directly, and the job may end). aiohttp does not cancel a handler whose client
disconnected, so one sweeper task notices closed connections for every follower at once and
wakes them, and each stream ends at once instead of polling the store until the job ends.
Followers are counted per API token, with a cap (429 past it), and exported as a gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Gauge

from orchestrator import metrics

FOLLOWERS = Gauge("gpuhop_log_followers", "Open logs?follow=true streams", registry=metrics.REGISTRY)

SWEEP_SECONDS = 0.2  # how soon a closed connection is noticed (cheap: no I/O, no store)


def connection_closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@dataclass(eq=False)
class Follower:
    request: web.Request
    job_id: str
    owner: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def gone(self) -> bool:
        return connection_closed(self.request)


class TooManyFollowers(Exception):
    pass


@dataclass
class Followers:
    max_per_token: int = 32
    _all: set[Follower] = field(default_factory=set)
    _per_owner: dict[str, int] = field(default_factory=dict)
    _sweeper: asyncio.Task[None] | None = None
    closing: bool = False  # the daemon is stopping: every stream ends now, so the stop is not held up

    @staticmethod
    def owner_of(token: str) -> str:
        """Who a follower counts against: a hash of the token, never the token itself."""
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    def count(self, owner: str | None = None) -> int:
        return len(self._all) if owner is None else self._per_owner.get(owner, 0)

    def add(self, request: web.Request, job_id: str, token: str) -> Follower:
        owner = self.owner_of(token)
        if self._per_owner.get(owner, 0) >= self.max_per_token:
            raise TooManyFollowers(
                f"at most {self.max_per_token} logs?follow=true streams per token at once; "
                "close one (or follow without follow=true)"
            )
        f = Follower(request, job_id, owner)
        self._all.add(f)
        self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        FOLLOWERS.inc()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="log-follow-sweeper")
        return f

    def remove(self, f: Follower) -> None:
        if f not in self._all:
            return
        self._all.discard(f)
        left = self._per_owner.get(f.owner, 1) - 1
        if left:
            self._per_owner[f.owner] = left
        else:
            self._per_owner.pop(f.owner, None)
        FOLLOWERS.dec()

    def notify(self, job_id: str) -> None:
        """New output (or a new state) for this job: wake its followers now."""
        for f in self._all:
            if f.job_id == job_id:
                f.wake.set()

    async def _sweep(self) -> None:
        while self._all:
            await asyncio.sleep(SWEEP_SECONDS)
            for f in list(self._all):
                if f.gone:
                    f.wake.set()

    async def close(self) -> None:
        self.closing = True
        for f in list(self._all):
            f.wake.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


async def wait(f: Follower, seconds: float) -> bool:
    """Until woken (output, disconnect: True) or `seconds` pass (False)."""
    try:
        await asyncio.wait_for(f.wake.wait(), seconds)
    except TimeoutError:
        return False
    f.wake.clear()
    return True
