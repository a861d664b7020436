"""The engine's side of moving jobs away from their volume (issue 11.2): the I/O around the pure
decision in orchestrator/moving.py.

* Capacity gaps: every offer refresh is compared with what was known of that provider, and only
  a change (a place ran out, or came back) is written (store.moves); the expected wait at a
  place is read from those gaps, at most every few seconds.
* The choice: when an object-store job's pinned place has nothing suitable, the offers
  elsewhere are ranked by placement and weighed against waiting (`choose`).
* Settling moves: a move recorded on a volume row is committed once its attempt launched and
  aborted once it provably never will (`settle`); `sweep` settles those a crash or an adopted
  launch left behind, and deletes the retired provider volumes, so storage never bills for a
  volume nobody owns.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping

from adapters.base import Adapter, VolumeSupport
from orchestrator.models import (
    AttemptStatus,
    CapacityType,
    JobSpec,
    JobStatus,
    Offer,
    parse_attempt_name,
)
from orchestrator.moving import (
    GapKey,
    GapStats,
    MoveChoice,
    MovingSettings,
    capacity_by_place,
    decide,
    gap_transitions,
)
from orchestrator.observation import describe
from orchestrator.offer_index import OfferIndex
from orchestrator.placement import PlacementSettings, RateStats, VolumeLocation, place
from orchestrator.store import Store, VolumeRow

log = logging.getLogger("gpuhop.moving")

GAP_STATS_MAX_AGE = 5.0  # seconds a read of the capacity gaps serves decisions
MOVE_CANDIDATES = 8


def moving_settings(s: object) -> MovingSettings:
    """config.MovingSettingsModel -> MovingSettings (fields of the same names)."""
    return MovingSettings(**{name: getattr(s, name) for name in MovingSettings.__dataclass_fields__})


class Relocation:
    def __init__(self, store: Store, adapters: Mapping[str, Adapter], settings: MovingSettings,
                 placement: PlacementSettings, slots: Mapping[str, asyncio.Semaphore], prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.adapters = adapters
        self.settings = settings
        self.placement = placement
        self._slots = slots
        self._known: dict[str, dict[GapKey, bool]] | None = None  # per provider: has capacity now
        self._stats: tuple[float, dict[GapKey, GapStats]] | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ capacity gaps

    async def observe(self, provider: str, offers: list[Offer]) -> None:
        """A fresh offer list of `provider`: write the gaps that opened or closed."""
        async with self._lock:
            if self._known is None:
                self._known = {}
                for key in await self.store.run(self.store.open_gap_keys):
                    self._known.setdefault(key[0], {})[key] = False
            known = self._known.get(provider, {})
            now_has = capacity_by_place(offers)
            opened, closed = gap_transitions(known, now_has)
            now = time.time()
            if opened:
                await self.store.run(self.store.open_capacity_gaps, opened, now)
            if closed:
                await self.store.run(self.store.close_capacity_gaps, closed, now)
            self._known[provider] = now_has
            if opened or closed:
                self._stats = None

    async def gap_stats(self) -> dict[GapKey, GapStats]:
        if self._stats is not None and time.monotonic() - self._stats[0] < GAP_STATS_MAX_AGE:
            return self._stats[1]
        now = time.time()
        rows = await self.store.run(self.store.capacity_gap_stats, now - self.settings.history_days * 86400, now)
        stats = {key: GapStats(ended, seconds) for key, (ended, seconds) in rows.items()}
        self._stats = (time.monotonic(), stats)
        return stats

    # ------------------------------------------------------------------ the choice

    async def choose(self, job_id: str, spec: JobSpec, index: OfferIndex, pinned: VolumeRow,
                     rates: Mapping[tuple[str, CapacityType], RateStats], exclude: frozenset[str]) -> MoveChoice:
        """Wait at the pinned place, or move (the places to try, best first), with the reason."""
        result = place(spec, index, VolumeLocation(None, None), rates, self.placement, exclude=exclude,
                       limit=MOVE_CANDIDATES + 1)
        elsewhere = [c for c in result.candidates
                     if (c.offer.provider, c.offer.region) != (pinned.provider, pinned.region)][:MOVE_CANDIDATES]
        attempts = await self.store.run(self.store.attempts, job_id)
        here = [a for a in attempts if (a.provider, a.region) == (pinned.provider, pinned.region)]
        last = here[-1] if here else None
        pinned_price = last.price_per_hour if last is not None else (
            elsewhere[0].expected_cost_per_hour if elsewhere else 0.0)
        gpus = list(spec.resources.gpu or ([last.gpu] if last is not None and last.gpu else []))
        if spec.resources.gpu_count == 0:
            gpus = [""]
        stats = await self.gap_stats()
        ended, seconds = 0, 0.0
        for gpu in gpus:
            gap = stats.get((pinned.provider or "", pinned.region or "", gpu))
            if gap is not None:
                ended, seconds = ended + gap.ended, seconds + gap.seconds
        size = pinned.checkpoint_gb if pinned.checkpoint_gb is not None else float(pinned.size_gb)
        return decide(elsewhere, f"{pinned.provider}/{pinned.region}", pinned_price, size,
                      GapStats(ended, seconds) if ended or seconds else None, self.settings)

    # ------------------------------------------------------------------ settling moves

    async def settle(self, name: str, in_flight: Callable[[], bool] = lambda: False) -> VolumeRow | None:
        """Commit or abort volume `name`'s move if its outcome is known: committed when its
        attempt launched; aborted when the attempt is gone or ended unlaunched and no launch of
        the job is `in_flight` (asked at the last moment: a launch may start meanwhile); else
        left. Returns the row as it is now."""
        vol = await self.store.run(self.store.volume, name)
        if vol is None or vol.move_attempt is None:
            return vol
        attempt = await self.store.run(self.store.attempt_by_name, vol.move_attempt)
        where = f"{vol.move_provider} {vol.move_region}"
        ours = attempt is not None and attempt.provider == vol.move_provider and (
            vol.move_volume_id is None or attempt.volume_id == vol.move_volume_id)
        if attempt is not None and ours and (attempt.instance_id or attempt.launched_at):
            await self.store.run(self.store.commit_volume_move, name, attempt.name, attempt.volume_id,
                                 f"left behind when attempt {attempt.number} moved the job to {where}")
            await self.store.run(self.store.add_event, attempt.job_id, "volume_moved",
                                 f"volume {name!r} now lives in {where} ({attempt.volume_id or vol.move_volume_id}); "
                                 f"the one in {vol.provider} {vol.region} ({vol.provider_volume_id}) is deleted",
                                 attempt.number)
        elif (attempt is not None and ours and attempt.status != AttemptStatus.ENDED.value) or in_flight():
            return vol
        else:
            volume_id = vol.move_volume_id or (attempt.volume_id if attempt is not None and ours else None)
            if volume_id is None:  # a crash between making the volume and writing its id: look it up
                volume_id = await self._find(vol)
            if in_flight():
                return vol
            await self.store.run(self.store.abort_volume_move, name, vol.move_attempt, volume_id,
                                 f"made for a move to {where} that never launched")
        await self.delete_retired()
        return await self.store.run(self.store.volume, name)

    async def _find(self, vol: VolumeRow) -> str | None:
        """The id of the move's volume, if one was made: looked up by name in the move's place
        (ensure_volume finds it; if none was made, the one it makes is retired all the same)."""
        adapter = self.adapters.get(vol.move_provider or "")
        if not isinstance(adapter, VolumeSupport) or vol.move_region is None:
            return None
        async with self._slots[vol.move_provider or ""]:
            found = await adapter.ensure_volume(vol.name, vol.size_gb, vol.move_region)
        return found.volume_id

    async def delete_retired(self) -> int:
        """Delete every retired provider volume its provider will delete; returns how many are
        left (a failing provider keeps its own for the next sweep)."""
        left = 0
        retired_rows = await self.store.run(self.store.retired_volumes)
        if not retired_rows:
            return 0
        # a machine still running on an old volume (a replacement started ahead of a reclaim
        # moved the job) keeps it until that attempt ends: providers refuse to delete it anyway
        attached = {(a.provider, a.volume_id) for a in await self.store.run(self.store.live_attempts) if a.volume_id}
        for retired in retired_rows:
            if (retired.provider, retired.provider_volume_id) in attached:
                left += 1
                continue
            vol = await self.store.run(self.store.volume, retired.volume_name)
            in_use = vol is not None and (retired.provider, retired.provider_volume_id) in (
                (vol.provider, vol.provider_volume_id), (vol.move_provider, vol.move_volume_id))
            adapter = self.adapters.get(retired.provider)
            if not in_use:
                if not isinstance(adapter, VolumeSupport):
                    left += 1
                    continue
                try:
                    async with self._slots[retired.provider]:
                        await adapter.delete_volume(retired.provider_volume_id)
                except Exception as exc:
                    log.warning("could not delete retired %s volume %s (%s): %s; will retry", retired.provider,
                                retired.provider_volume_id, retired.volume_name, describe(exc))
                    left += 1
                    continue
                log.info("deleted %s volume %s in %s (%s): %s", retired.provider, retired.provider_volume_id,
                         retired.region, retired.volume_name, retired.reason)
            await self.store.run(self.store.forget_retired_volume, retired.id or 0)
        return left

    async def sweep(self, launching: Callable[[str], bool], owned: Callable[[str], bool], leader: bool) -> None:
        """Settle the moves a crash or an adopted launch left, then delete retired volumes. Only
        moves of jobs this daemon decides (`owned`), with no launch in flight, or of ended jobs
        when it is the `leader`: another replica's launch may be between recording a move and
        its attempt."""
        for vol in await self.store.run(self.store.moving_volumes):
            parsed = parse_attempt_name(self.prefix, vol.move_attempt or "")
            if parsed is None or launching(parsed[0]):
                continue
            if not owned(parsed[0]):
                job = await self.store.run(self.store.get_job, parsed[0])
                if not leader or (job is not None and not JobStatus(job.status).terminal):
                    continue
            try:
                await self.settle(vol.name, in_flight=functools.partial(launching, parsed[0]))
            except Exception as exc:  # housekeeping: the next sweep tries again
                log.warning("settling the move of volume %s failed: %s", vol.name, describe(exc))
        await self.delete_retired()
