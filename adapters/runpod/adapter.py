"""gpuhop's RunPod provider: offers, one listing call per tick, launches, terminations and
network volumes, over one of two transports (transport.py): RunPod's REST API v2 (rest.py, the
default) or its deprecated GraphQL API (graphql.py, `api = "graphql"`, until RunPod retires it).

Late-2026 RunPod: on-demand only (spot only behind the `interruptible` opt-in, GraphQL only);
Secure Cloud offers per data center, Community Cloud offers per country (never pinned to a data
center, no network volumes); `minCudaVersion` sent from the job's `min_cuda`; the start command as
ENTRYPOINT + CMD arrays (the agent's bootstrap), which replace the image's own ENTRYPOINT.
"Exited by RunPod" pods carry `Instance.fault` (IMAGE, ACCOUNT) from RunPod's words.

Launch is idempotent by pod name, also when RunPod is slow: each try first looks the name up,
and a create whose answer never came (timed out, connection lost, 5xx) may still land, so no new
create is sent for that name until the pod shows up or `create_settle_seconds` have passed
(RetryLater meanwhile). Launches of one name never run concurrently. The listing keeps every pod
(one Instance per pod id, duplicates included) with its `Bill` by RunPod's own times, and
`terminate` stops the pod (RunPod's answer says when billing ended), deletes it and returns the
final Bill. The job's command runs under the gpuhop agent (`cloud_bootstrap`) with
GPUHOP_LINGER=1 so that RunPod does not restart the container when the job ends.
"""

from __future__ import annotations

import asyncio
import time

from adapters.base import (
    Adapter,
    AdapterContext,
    NoCapacity,
    PermanentError,
    RetryLater,
    VolumeSupport,
)
from adapters.runpod.client import PROVIDER, RunPodClient, is_not_found
from adapters.runpod.graphql import GraphQLTransport
from adapters.runpod.offers import OfferKey
from adapters.runpod.rest import RestTransport
from adapters.runpod.settings import RunPodSettings
from adapters.runpod.transport import CreatePod, Transport
from orchestrator.agent import cloud_bootstrap
from orchestrator.models import Bill, Instance, InstanceState, LaunchRequest, Offer, ProviderVolume

# the state a launch prefers to return when several pods carry its name
_PREFERENCE = {InstanceState.RUNNING: 0, InstanceState.PENDING: 1}


def make_transport(client: RunPodClient) -> Transport:
    return GraphQLTransport(client) if client.settings.api == "graphql" else RestTransport(client)


class RunPodAdapter(Adapter, VolumeSupport):
    name = "runpod"
    Settings = RunPodSettings
    notice_seconds = 5

    def __init__(self, settings: RunPodSettings, ctx: AdapterContext) -> None:
        super().__init__(settings, ctx)
        self.settings: RunPodSettings = settings
        self.client = RunPodClient(settings)
        self.transport = make_transport(self.client)
        self._offers: tuple[float, list[Offer]] | None = None
        self._offers_lock = asyncio.Lock()
        self._volume_lock = asyncio.Lock()
        self._regions: dict[str, str] = {}  # pod id -> data center, from our own launches
        # pod name -> (lock, [callers]): one launch of a name at a time
        self._launch_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        # pod name -> when a create was sent whose answer never came (it may still land)
        self._unsettled: dict[str, float] = {}

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    # ------------------------------------------------------------------ offers

    async def offers(self) -> list[Offer]:
        async with self._offers_lock:
            now = time.monotonic()
            if self._offers and now - self._offers[0] < self.settings.offer_ttl_seconds:
                return list(self._offers[1])
            offers = await self.client.retrying("offers", self._fetch_offers)
            self._offers = (time.monotonic(), offers)
            return list(offers)

    async def _fetch_offers(self) -> list[Offer]:
        s = self.settings
        return await self.transport.offers(
            s.data_centers, [c.upper() for c in s.cloud_types], s.interruptible and s.api == "graphql",
            s.max_gpu_count, s.max_container_disk_gb)

    async def verify(self) -> str:
        opened = self.client.open
        try:
            return await self.client.retrying("verify", self.transport.verify)
        finally:
            if not opened:
                await self.client.close()

    # ------------------------------------------------------------------ listing

    def _ours(self, pods: list[Instance]) -> list[Instance]:
        """Every pod of ours, one Instance per pod id (two pods with one name stay two)."""
        prefix = f"{self.ctx.prefix}-"
        return [p for p in pods if p.name.startswith(prefix)]

    async def list_instances(self) -> list[Instance]:
        return self._ours(await self.client.retrying("list pods", lambda: self.transport.pods(self._regions)))

    # ------------------------------------------------------------------ launch

    async def launch(self, req: LaunchRequest) -> Instance:
        key = OfferKey.decode(req.offer.offer_id)
        if req.volume is not None:
            if key.cloud != "SECURE":
                raise PermanentError("RunPod network volumes need Secure Cloud", provider=PROVIDER)
            if req.volume.region != key.data_center:
                raise PermanentError(
                    f"volume {req.volume.name} is in {req.volume.region}, the offer in "
                    f"{key.data_center}", provider=PROVIDER,
                )
        if key.spot and not (self.settings.interruptible and self.settings.api == "graphql"):
            raise PermanentError("RunPod has no interruptible pods (ended September 2026); "
                                 'opt in with interruptible = true and api = "graphql"', provider=PROVIDER)

        entry = self._launch_locks.setdefault(req.name, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                return await self.client.retrying("launch", lambda: self._launch_once(req, key))
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                self._launch_locks.pop(req.name, None)

    async def _launch_once(self, req: LaunchRequest, key: OfferKey) -> Instance:
        pods = await self.transport.pods(self._regions)
        same = [i for i in self._ours(pods) if i.name == req.name and i.state != InstanceState.TERMINATED]
        if same:
            self._unsettled.pop(req.name, None)
            return min(same, key=lambda i: _PREFERENCE.get(i.state, 2))
        sent = self._unsettled.get(req.name)
        settle = self.settings.create_settle_seconds
        if sent is not None and time.monotonic() - sent < settle:
            raise RetryLater(
                f"RunPod launch {req.name}: an earlier create got no answer and may still land; "
                f"not creating again before it shows or {settle:g} s pass", provider=PROVIDER,
                delay=min(5.0, settle),
            )
        self._unsettled[req.name] = time.monotonic()
        try:
            inst = await self._create(req, key)
        except RetryLater as exc:
            if "HTTP 429" in str(exc):
                self._unsettled.pop(req.name, None)  # throttled: RunPod did not take it
            raise
        except Exception as exc:
            self._unsettled.pop(req.name, None)  # RunPod answered: nothing was created
            if isinstance(exc, NoCapacity):
                # the cached listing promised capacity that is gone: list again next time, or
                # placement keeps choosing it (and a job that could move waits) for offer_ttl_seconds
                self._offers = None
            raise
        self._unsettled.pop(req.name, None)
        return inst

    def _pod_env(self, req: LaunchRequest) -> dict[str, str]:
        _shell, extra = cloud_bootstrap(req.command)
        env = dict(req.env)
        env.update(extra)
        env["GPUHOP_VOLUME"] = req.mount_path
        env["GPUHOP_LINGER"] = "1"
        return env

    async def _create(self, req: LaunchRequest, key: OfferKey) -> Instance:
        bid = None
        if key.spot:
            bid = req.offer.price_per_hour / key.gpu_count
            if req.bid_price_per_hour:
                bid = max(bid, req.bid_price_per_hour / key.gpu_count)
        spec = CreatePod(
            name=req.name, key=key, image=req.image, env=self._pod_env(req),
            container_disk_gb=min(req.disk_gb, self.settings.max_container_disk_gb),
            mount_path=req.mount_path, volume_id=req.volume.volume_id if req.volume else None,
            min_cuda=req.min_cuda, bid_per_gpu=bid,
        )
        made = await self.transport.create(spec)
        self._regions[made.instance_id] = key.place
        made.region = key.place
        made.price_per_hour = req.offer.price_per_hour
        made.state = InstanceState.PENDING
        return made

    # ------------------------------------------------------------------ terminate

    async def terminate(self, instance_id: str) -> Bill | None:
        """Stop the pod (RunPod's answer says when its billing ended), then delete it; returns
        the final Bill, or None for a pod that was already gone before we could read it."""
        final: list[Bill | None] = [None]  # kept across retries: a retried stop finds no pod

        async def attempt() -> Bill | None:
            try:
                stopped = await self.transport.stop(instance_id)
                if stopped is None:
                    if final[0] is None:
                        return self._gone(instance_id, None)
                else:
                    final[0] = stopped.bill or final[0]
            except PermanentError as exc:
                if is_not_found(exc):
                    return self._gone(instance_id, final[0])
                # RunPod would not stop it: delete it anyway, billed until now
                found = [p for p in await self.transport.pods(self._regions) if p.instance_id == instance_id]
                if not found:
                    return self._gone(instance_id, final[0])
                now = float(int(time.time()))
                bill = found[0].bill
                final[0] = Bill(bill.started_at, bill.ended_at or now, bill.cost_usd) if bill else None
            await self.transport.delete(instance_id)
            return self._gone(instance_id, final[0])

        return await self.client.retrying("terminate", attempt)

    def _gone(self, instance_id: str, bill: Bill | None) -> Bill | None:
        self._regions.pop(instance_id, None)
        return bill

    # ------------------------------------------------------------------ volumes

    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        async def attempt() -> ProviderVolume:
            for v in await self.transport.volumes():
                if v.name == name and v.region == region:
                    return v
            return await self.transport.create_volume(name, size_gb, region)

        async with self._volume_lock:
            return await self.client.retrying("ensure volume", attempt)

    async def delete_volume(self, volume_id: str) -> None:
        async def attempt() -> None:
            try:
                await self.transport.delete_volume(volume_id)
            except PermanentError:
                if any(v.volume_id == volume_id for v in await self.transport.volumes()):
                    raise

        async with self._volume_lock:
            await self.client.retrying("delete volume", attempt)

    def storage_usd_per_month(self, size_gb: int) -> float:
        """Network volumes: $0.07/GB-month for the first TB, $0.05/GB-month above it."""
        return round(min(size_gb, 1000) * 0.07 + max(size_gb - 1000, 0) * 0.05, 6)
