"""Deleting network volumes, one way for everyone: `DELETE /v1/volumes/{name}` (`gpuhop volume
rm`) and the `[volumes] delete_after_days` retention both call `delete_volume`.

A volume is money every month and the only copy of a job's checkpoints, so deletion is careful:
the store claims the volume first (refused while a job that has not ended names it, and a submit
naming a claimed volume is refused: the database orders the two, see Store.begin_volume_delete),
then the provider's volume is deleted through its adapter ("already gone" is success), and only
then the row goes, with an event on the newest job that used it and a log line. A provider that
fails gives the claim back and leaves the row: nothing is forgotten that may still bill. A
deleter that dies between the two leaves a claim that blocks submits until it is taken over
(`gpuhop volume rm` again, or the retention sweep once the claim's lease has run out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping

from adapters.base import Adapter, AdapterError, RetryLater, VolumeSupport
from orchestrator.objectstore import ObjectStore, StorageError
from orchestrator.store import Store, VolumeRow

log = logging.getLogger("gpuhop.volumes")

CLAIM_LEASE_SECONDS = 300.0  # a deletion not finished by then was interrupted: another may take over
SWEEP_EVERY_SECONDS = 3600.0
FIRST_SWEEP_AFTER_SECONDS = 60.0  # let the providers start first


class DeleteFailed(Exception):
    """The provider could not delete the volume; the volume and its row are kept. `status` is
    the HTTP answer: 503 (try again later: `retry_after` seconds) or 502 (the provider said no,
    or its provider is not configured here)."""

    def __init__(self, message: str, status: int = 502, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def monthly_storage_usd(vol: VolumeRow, adapters: Mapping[str, Adapter]) -> float:
    """What the volume costs per month while it exists (0 until a provider holds it)."""
    if not vol.provider_volume_id:
        return 0.0
    return storage_usd(adapters, vol.provider or "", vol.size_gb) or 0.0


def storage_usd(adapters: Mapping[str, Adapter], provider: str, size_gb: int) -> float | None:
    """What `size_gb` of volume storage at `provider` costs per month; None where that provider
    is not configured here (its price is unknown)."""
    adapter = adapters.get(provider)
    if not isinstance(adapter, VolumeSupport):
        return None
    return float(adapter.storage_usd_per_month(size_gb))


def where(vol: VolumeRow) -> str:
    return f"{vol.provider} {vol.region} ({vol.provider_volume_id})" if vol.provider else "never created on a provider"


async def delete_volume(store: Store, adapters: Mapping[str, Adapter], name: str, why: str, *,
                        now: float | None = None, unused_since: float | None = None,
                        objects: ObjectStore | None = None) -> VolumeRow | None:
    """Delete volume `name` everywhere, its checkpoints in object storage too (`objects`: a job
    naming it again would otherwise restore them); returns it as it was (None: there is no such volume).
    Raises store.Conflict when a job that has not ended uses it, another deletion is under way,
    or (given `unused_since`) a job used it since; DeleteFailed when the provider could not
    delete it (the volume stays)."""
    token = secrets.token_hex(8)
    vol = await store.run(store.begin_volume_delete, name, token, now, unused_since=unused_since,
                          lease_seconds=CLAIM_LEASE_SECONDS)
    if vol is None:
        return None
    if vol.provider is not None and vol.provider_volume_id:
        try:
            await _delete_at_provider(adapters, vol)
        except asyncio.CancelledError:
            raise  # the outcome is unknown: the claim stays until its lease runs out
        except Exception:
            with contextlib.suppress(Exception):
                await store.run(store.abort_volume_delete, name, token)
            raise
    if objects is not None and await store.run(store.volume_synced, name):
        try:
            await objects.delete_volume(name)
        except StorageError as exc:
            with contextlib.suppress(Exception):
                await store.run(store.abort_volume_delete, name, token)
            raise DeleteFailed(f"volume {name!r}: its checkpoints in object storage were not deleted: {exc}; "
                               "try again", 503, retry_after=10.0) from None
    if not await store.run(store.finish_volume_delete, name, token, f"{why} (was {where(vol)})"):
        log.warning("volume %s: the deletion's claim was taken over meanwhile; its row is the other deleter's", name)
    log.info("deleted volume %s (%s, %d GB): %s", name, where(vol), vol.size_gb, why)
    return vol


async def _delete_at_provider(adapters: Mapping[str, Adapter], vol: VolumeRow) -> None:
    adapter = adapters.get(vol.provider or "")
    if not isinstance(adapter, VolumeSupport):
        raise DeleteFailed(f"volume {vol.name!r} lives on {vol.provider}, which is not configured here "
                           f"(or cannot delete volumes); configure [providers.{vol.provider}] to delete it")
    what = f"{vol.provider} could not delete volume {vol.name!r} ({vol.provider_volume_id}); it is kept"
    try:
        await adapter.delete_volume(vol.provider_volume_id or "")
    except RetryLater as exc:
        raise DeleteFailed(f"{what}: {exc}; try again", 503, retry_after=max(1.0, exc.delay)) from None
    except (TimeoutError, OSError) as exc:
        raise DeleteFailed(f"{what}: {type(exc).__name__}: {exc}; try again", 503, retry_after=10.0) from None
    except AdapterError as exc:  # adapters' messages never hold secrets
        raise DeleteFailed(f"{what}: {exc}") from None
    except Exception as exc:  # another library's text may quote a URL or a key: the log has it, not the answer
        log.warning("deleting %s volume %s failed: %r", vol.provider, vol.provider_volume_id, exc)
        raise DeleteFailed(f"{what}: {type(exc).__name__} (see the daemon's log)") from None


async def sweep(store: Store, adapters: Mapping[str, Adapter], delete_after_days: float,
                now: float | None = None, ready: Callable[[str], bool] | None = None,
                stop: asyncio.Event | None = None, objects: ObjectStore | None = None) -> list[str]:
    """One retention pass: delete the volumes no job has used for `delete_after_days` (0: none),
    and finish deletions that were interrupted. Volumes on a provider that is not `ready`
    (not started yet) wait for the next pass; a `stop` ends the pass between two volumes.
    Returns the names deleted."""
    now = time.time() if now is None else now
    unused_since = now - delete_after_days * 86400.0 if delete_after_days > 0 else None
    due = await store.run(store.volumes_to_sweep, unused_since, now - CLAIM_LEASE_SECONDS)
    deleted: list[str] = []
    for name, interrupted in due:
        if stop is not None and stop.is_set():
            break
        vol = await store.run(store.volume, name)
        if vol is None:
            continue
        if ready is not None and vol.provider in adapters and not ready(vol.provider or ""):
            continue
        why = ("finishing a deletion that was interrupted" if interrupted else
               f"no job used it for {delete_after_days:g} days ([volumes] delete_after_days)")
        try:
            if await delete_volume(store, adapters, name, why, now=now,
                                   unused_since=None if interrupted else unused_since, objects=objects):
                deleted.append(name)
        except DeleteFailed as exc:
            log.warning("retention: %s", exc)
        except Exception as exc:  # a job took it meanwhile (store.Conflict), or a store hiccup
            log.info("retention: volume %s not deleted: %s", name, exc)
    return deleted


async def retention_loop(store: Store, adapters: Mapping[str, Adapter], delete_after_days: float,
                         stop: asyncio.Event, ready: Callable[[str], bool] | None = None,
                         every: float = SWEEP_EVERY_SECONDS, first_after: float = FIRST_SWEEP_AFTER_SECONDS,
                         objects: ObjectStore | None = None) -> None:
    """`sweep` every `every` seconds until `stop` is set (the daemon runs it beside the engine)."""
    wait = first_after
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
            return
        wait = every
        try:
            await sweep(store, adapters, delete_after_days, ready=ready, stop=stop, objects=objects)
        except Exception as exc:  # housekeeping: never take the daemon down for it
            log.warning("volume retention failed: %s", exc)
