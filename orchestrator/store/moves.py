"""The store's verbs for jobs that move away from their volume (issue 11.2): capacity gaps, the
volume row's move in progress, and the provider volumes a move leaves to delete.

A move replaces a job's provider volume with a new one elsewhere. Both cost storage every month
and a crash may strike between any two steps, so every step is written before the next one
relies on it: the move is recorded on the volume row before the new volume is made
(`begin_volume_move`), its id as soon as the provider returns it (`set_move_volume`); once the
move's attempt has launched, one transaction makes the new volume the row's and queues the old
one for deletion (`commit_volume_move`); if it never launched, the new one is queued instead
(`abort_volume_move`). Whatever a crash interrupts, each provider volume is either the row's,
the row's move, or in `retired_volumes`: never owned by nobody.

Mixed into Store, which provides the sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from sqlalchemy import delete
from sqlmodel import Session, col, select

from orchestrator.store.tables import CapacityGapRow, RetiredVolumeRow, VolumeRow

GapKey = tuple[str, str, str]  # (provider, region, GPU model or "")


class MoveStore:
    _write: Callable[[], Session]
    _session: Callable[[], Session]

    # ------------------------------------------------------------------ capacity gaps

    def open_capacity_gaps(self, keys: Iterable[GapKey], now: float) -> None:
        """Places that just ran out of capacity: a gap starts now (unless one is open there)."""
        with self._write() as s:
            for provider, region, gpu in keys:
                if self._open_gap(s, provider, region, gpu) is None:
                    s.add(CapacityGapRow(provider=provider, region=region, gpu=gpu, started_at=now))
            s.commit()

    def close_capacity_gaps(self, keys: Iterable[GapKey], now: float) -> None:
        """Places whose capacity came back: their open gap ends now."""
        with self._write() as s:
            for provider, region, gpu in keys:
                gap = self._open_gap(s, provider, region, gpu)
                if gap is not None:
                    gap.ended_at = max(now, gap.started_at)
                    s.add(gap)
            s.commit()

    @staticmethod
    def _open_gap(s: Session, provider: str, region: str, gpu: str) -> CapacityGapRow | None:
        return s.exec(select(CapacityGapRow).where(
            CapacityGapRow.provider == provider, CapacityGapRow.region == region, CapacityGapRow.gpu == gpu,
            col(CapacityGapRow.ended_at).is_(None))).first()

    def open_gap_keys(self) -> set[GapKey]:
        with self._session() as s:
            rows = s.exec(select(CapacityGapRow.provider, CapacityGapRow.region, CapacityGapRow.gpu)
                          .where(col(CapacityGapRow.ended_at).is_(None))).all()
        return {(p, r, g) for p, r, g in rows}

    def capacity_gap_stats(self, since: float, now: float) -> dict[GapKey, tuple[int, float]]:
        """Per place: (gaps that ended, seconds of every gap) over the gaps since `since` and
        those still open."""
        out: dict[GapKey, tuple[int, float]] = {}
        with self._session() as s:
            rows = s.exec(select(CapacityGapRow).where(
                (col(CapacityGapRow.ended_at).is_(None)) | (col(CapacityGapRow.started_at) >= since))).all()
        for gap in rows:
            key = (gap.provider, gap.region, gap.gpu)
            ended, seconds = out.get(key, (0, 0.0))
            end = gap.ended_at if gap.ended_at is not None else now
            out[key] = (ended + (gap.ended_at is not None), seconds + max(0.0, end - gap.started_at))
        return out

    def prune_capacity_gaps(self, before: float) -> None:
        with self._write() as s:
            s.execute(delete(CapacityGapRow).where(col(CapacityGapRow.ended_at).is_not(None),
                                                   col(CapacityGapRow.started_at) < before))
            s.commit()

    # ------------------------------------------------------------------ moves

    def begin_volume_move(self, name: str, from_volume_id: str | None, provider: str, region: str,
                          attempt: str) -> str | None:
        """Record that volume `name` is about to get a new provider volume at provider/region for
        the attempt named `attempt`, before that volume is made. Returns None when recorded, else
        why not: the row changed since it was read (another move, a deletion), or a volume of
        this name retired there is not deleted yet (it would be found by name and reused)."""
        with self._write() as s:
            vol = s.exec(select(VolumeRow).where(VolumeRow.name == name).with_for_update()).first()
            if vol is None or vol.deleting_token is not None:
                return f"volume {name!r} is being deleted"
            if vol.move_attempt is not None:
                return f"volume {name!r} is already moving (for {vol.move_attempt})"
            if vol.provider_volume_id != from_volume_id:
                return f"volume {name!r} changed meanwhile"
            left = s.exec(select(RetiredVolumeRow).where(
                RetiredVolumeRow.volume_name == name, RetiredVolumeRow.provider == provider,
                RetiredVolumeRow.region == region)).first()
            if left is not None:
                return f"a retired copy of volume {name!r} in {provider}/{region} is not deleted yet"
            vol.move_provider, vol.move_region, vol.move_volume_id, vol.move_attempt = provider, region, None, attempt
            s.add(vol)
            s.commit()
            return None

    def set_move_volume(self, name: str, attempt: str, volume_id: str) -> bool:
        """The move's new volume exists: remember its id."""
        with self._write() as s:
            vol = s.exec(select(VolumeRow).where(VolumeRow.name == name).with_for_update()).first()
            if vol is None or vol.move_attempt != attempt:
                return False
            vol.move_volume_id = volume_id
            s.add(vol)
            s.commit()
            return True

    def commit_volume_move(self, name: str, attempt: str, volume_id: str | None, why: str) -> bool:
        """The move's attempt launched: its volume becomes the row's, the old one is retired (in
        one transaction). False: no such move (settled already, or never begun)."""
        with self._write() as s:
            vol = s.exec(select(VolumeRow).where(VolumeRow.name == name).with_for_update()).first()
            if vol is None or vol.move_attempt != attempt or vol.move_provider is None:
                return False
            new_id = volume_id or vol.move_volume_id
            # ids are the provider's own: two providers may use the same one
            if vol.provider and vol.provider_volume_id and (vol.provider, vol.provider_volume_id) != (
                    vol.move_provider, new_id):
                s.add(RetiredVolumeRow(volume_name=name, provider=vol.provider, region=vol.region or "",
                                       provider_volume_id=vol.provider_volume_id, reason=why[:512],
                                       created_at=time.time()))
            vol.provider, vol.region, vol.provider_volume_id = vol.move_provider, vol.move_region, new_id
            vol.move_provider = vol.move_region = vol.move_volume_id = vol.move_attempt = None
            s.add(vol)
            s.commit()
            return True

    def abort_volume_move(self, name: str, attempt: str, volume_id: str | None, why: str) -> bool:
        """The move's attempt never launched: its new volume (if one was made: `volume_id`, else
        the recorded one) is retired and the row stays where it was. False: no such move."""
        with self._write() as s:
            vol = s.exec(select(VolumeRow).where(VolumeRow.name == name).with_for_update()).first()
            if vol is None or vol.move_attempt != attempt:
                return False
            new_id = volume_id or vol.move_volume_id
            if new_id and vol.move_provider and (vol.move_provider, new_id) != (vol.provider, vol.provider_volume_id):
                s.add(RetiredVolumeRow(volume_name=name, provider=vol.move_provider, region=vol.move_region or "",
                                       provider_volume_id=new_id, reason=why[:512], created_at=time.time()))
            vol.move_provider = vol.move_region = vol.move_volume_id = vol.move_attempt = None
            s.add(vol)
            s.commit()
            return True

    def moving_volumes(self) -> list[VolumeRow]:
        with self._session() as s:
            return list(s.exec(select(VolumeRow).where(col(VolumeRow.move_attempt).is_not(None))))

    def retired_volumes(self) -> list[RetiredVolumeRow]:
        with self._session() as s:
            return list(s.exec(select(RetiredVolumeRow).order_by(col(RetiredVolumeRow.id))))

    def forget_retired_volume(self, retired_id: int) -> None:
        """Its provider confirmed it gone (or it turned out to be in use: never deleted)."""
        with self._write() as s:
            s.execute(delete(RetiredVolumeRow).where(col(RetiredVolumeRow.id) == retired_id))
            s.commit()

    def set_checkpoint_size(self, name: str, gb: float) -> None:
        """How big volume `name`'s latest complete checkpoint is (a move restores that much)."""
        with self._write() as s:
            vol = s.exec(select(VolumeRow).where(VolumeRow.name == name).with_for_update()).first()
            if vol is not None:
                vol.checkpoint_gb = max(0.0, gb)
                s.add(vol)
                s.commit()
