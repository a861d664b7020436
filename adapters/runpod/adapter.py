"""gpuhop's RunPod provider: offers from GraphQL, pods launched with the SDK's own mutation
text over native async HTTP (client.py), one listing call per tick, network volumes per data
center.

Launch is idempotent by pod name, also when RunPod is slow: each try first looks the name up,
and a create whose answer never came (timed out, connection lost, 5xx) may still land, so no new
create is sent for that name until the pod shows up or `create_settle_seconds` have passed
(RetryLater meanwhile). Launches of one name never run concurrently. The listing keeps every pod
(one Instance per pod id, duplicates included) with its `Bill` by RunPod's own times, and
`terminate` stops the pod (RunPod's answer says when billing ended), deletes it and returns the
final Bill. The job's command runs under the gpuhop agent (`cloud_bootstrap`) with
GPUHOP_LINGER=1 so that RunPod does not restart the container when the job ends. Every string that
goes into the inline query text is escaped with `gql_string`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from runpod.api.mutations.pods import (
    generate_pod_deployment_mutation,
    generate_pod_terminate_mutation,
)

from adapters.base import (
    Adapter,
    AdapterContext,
    NoCapacity,
    PermanentError,
    RetryLater,
    VolumeSupport,
)
from adapters.runpod.client import PROVIDER, RunPodClient, gql_string, is_not_found
from adapters.runpod.offers import DATA_CENTERS_QUERY, OfferKey, offers_query, parse_offers
from adapters.runpod.settings import RunPodSettings
from adapters.runpod.status import pod_bill, pod_region, to_instance
from orchestrator.agent import cloud_bootstrap
from orchestrator.models import Bill, Instance, InstanceState, LaunchRequest, Offer, ProviderVolume

BILL_FIELDS = "desiredStatus lastStatusChange lastStartedAt costPerHr"
PODS_QUERY = (
    f"query Pods {{ myself {{ pods {{ id name {BILL_FIELDS} gpuCount "
    "podType networkVolumeId uptimeSeconds runtime { uptimeInSeconds } "
    "machine { gpuDisplayName location } } networkVolumes { id name size dataCenterId } } }"
)
VOLUMES_QUERY = "query Volumes { myself { networkVolumes { id name size dataCenterId } } }"
POD_FIELDS = "id name desiredStatus lastStatusChange costPerHr machine { location }"
# the state a launch prefers to return when several pods carry its name
_PREFERENCE = {InstanceState.RUNNING: 0, InstanceState.PENDING: 1}


class RunPodAdapter(Adapter, VolumeSupport):
    name = "runpod"
    Settings = RunPodSettings
    notice_seconds = 5

    def __init__(self, settings: RunPodSettings, ctx: AdapterContext) -> None:
        super().__init__(settings, ctx)
        self.settings: RunPodSettings = settings
        self.client = RunPodClient(settings)
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
        dcs = self.settings.data_centers
        if dcs is None:
            data = await self.client.query("dataCenters", DATA_CENTERS_QUERY)
            dcs = [d["id"] for d in data.get("dataCenters") or [] if isinstance(d, dict) and d.get("id")]
        if not dcs:
            return []
        clouds = [c.upper() for c in self.settings.cloud_types]
        text, aliases = offers_query(dcs, clouds)
        data = await self.client.query("gpuTypes", text)
        return parse_offers(data.get("gpuTypes"), aliases, self.settings)

    # ------------------------------------------------------------------ listing

    async def _listing(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        data = await self.client.query("list pods", PODS_QUERY)
        myself = data.get("myself") or {}
        pods = [p for p in myself.get("pods") or [] if isinstance(p, dict) and p.get("id")]
        volume_dcs = {
            str(v["id"]): str(v.get("dataCenterId") or "")
            for v in myself.get("networkVolumes") or [] if isinstance(v, dict) and v.get("id")
        }
        return pods, volume_dcs

    def _ours(self, pods: list[dict[str, Any]], volume_dcs: dict[str, str]) -> list[Instance]:
        """Every pod of ours, one Instance per pod id (two pods with one name stay two)."""
        prefix = f"{self.ctx.prefix}-"
        now = time.time()
        return [
            to_instance(p, pod_region(p, self._regions, volume_dcs), now)
            for p in pods if str(p.get("name") or "").startswith(prefix)
        ]

    async def list_instances(self) -> list[Instance]:
        pods, volume_dcs = await self.client.retrying("list pods", self._listing)
        return self._ours(pods, volume_dcs)

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
        pods, volume_dcs = await self._listing()
        same = [i for i in self._ours(pods, volume_dcs)
                if i.name == req.name and i.state != InstanceState.TERMINATED]
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
        except Exception:
            self._unsettled.pop(req.name, None)  # RunPod answered: nothing was created
            raise
        self._unsettled.pop(req.name, None)
        return inst

    def _pod_env(self, req: LaunchRequest) -> tuple[str, dict[str, str]]:
        shell, extra = cloud_bootstrap(req.command)
        env = dict(req.env)
        env.update(extra)
        env["GPUHOP_VOLUME"] = req.mount_path
        env["GPUHOP_LINGER"] = "1"
        return shell, env

    async def _create(self, req: LaunchRequest, key: OfferKey) -> Instance:
        shell, env = self._pod_env(req)
        volume_id = req.volume.volume_id if req.volume else None
        if key.spot:
            per_gpu = req.offer.price_per_hour / key.gpu_count
            if req.bid_price_per_hour:
                per_gpu = max(per_gpu, req.bid_price_per_hour / key.gpu_count)
            pod = await self._rent_interruptable(req, key, shell, env, volume_id, per_gpu)
        else:
            # the SDK's create_pod, minus its gpuTypes pre-check (RunPod refuses an unknown
            # type in the mutation itself) and its volume lookup (the offer names the data center)
            text = generate_pod_deployment_mutation(
                name=gql_string(req.name),
                image_name=gql_string(req.image),
                gpu_type_id=gql_string(key.gpu_type_id),
                cloud_type=key.cloud,
                data_center_id=gql_string(key.data_center),
                gpu_count=key.gpu_count,
                volume_in_gb=0,
                container_disk_in_gb=min(req.disk_gb, self.settings.max_container_disk_gb),
                min_vcpu_count=1,
                min_memory_in_gb=1,
                docker_args=gql_string(shell),
                volume_mount_path=gql_string(req.mount_path),
                env={gql_string(k): gql_string(v) for k, v in env.items()},
                network_volume_id=gql_string(volume_id) if volume_id else None,
            )
            data = await self.client.query("launch", text)
            created = data.get("podFindAndDeployOnDemand")
            pod = created if isinstance(created, dict) else {}
        if not pod.get("id"):
            raise NoCapacity("RunPod launch: no pod was returned", provider=PROVIDER)
        self._regions[str(pod["id"])] = key.data_center
        return Instance(
            provider=PROVIDER,
            instance_id=str(pod["id"]),
            name=req.name,
            state=InstanceState.PENDING,
            region=key.data_center,
            price_per_hour=req.offer.price_per_hour,
            reason=str(pod.get("lastStatusChange") or ""),
        )

    async def _rent_interruptable(
        self, req: LaunchRequest, key: OfferKey, shell: str, env: dict[str, str],
        volume_id: str | None, bid_per_gpu: float,
    ) -> dict[str, Any]:
        env_items = ", ".join(
            f'{{key: "{gql_string(k)}", value: "{gql_string(v)}"}}' for k, v in env.items()
        )
        fields = [
            f"bidPerGpu: {bid_per_gpu:.6f}",
            f'name: "{gql_string(req.name)}"',
            f'imageName: "{gql_string(req.image)}"',
            f"cloudType: {key.cloud}",
            f'gpuTypeId: "{gql_string(key.gpu_type_id)}"',
            f"gpuCount: {key.gpu_count}",
            f'dataCenterId: "{gql_string(key.data_center)}"',
            f"containerDiskInGb: {min(req.disk_gb, self.settings.max_container_disk_gb)}",
            "volumeInGb: 0",
            f'dockerArgs: "{gql_string(shell)}"',
            f'volumeMountPath: "{gql_string(req.mount_path)}"',
            f"env: [{env_items}]",
        ]
        if volume_id:
            fields.append(f'networkVolumeId: "{gql_string(volume_id)}"')
        text = f"mutation {{ podRentInterruptable(input: {{{', '.join(fields)}}}) {{ {POD_FIELDS} }} }}"
        data = await self.client.query("launch (spot)", text)
        pod = data.get("podRentInterruptable")
        return pod if isinstance(pod, dict) else {}

    # ------------------------------------------------------------------ terminate

    async def terminate(self, instance_id: str) -> Bill | None:
        """Stop the pod (RunPod's answer says when its billing ended), then delete it; returns
        the final Bill, or None for a pod that was already gone before we could read it."""
        pid = gql_string(instance_id)
        stop = f'mutation {{ podStop(input: {{podId: "{pid}"}}) {{ id {BILL_FIELDS} }} }}'
        final: list[Bill | None] = [None]  # kept across retries: a retried stop finds no pod

        async def attempt() -> Bill | None:
            try:
                data = await self.client.query("terminate (stop)", stop)
                pod = data.get("podStop")
                if isinstance(pod, dict):
                    final[0] = pod_bill(pod, time.time()) or final[0]
            except PermanentError as exc:
                if not is_not_found(exc):
                    # RunPod would not stop it: delete it anyway, billed until now
                    pods, _ = await self._listing()
                    found = [p for p in pods if str(p.get("id")) == instance_id]
                    if not found:
                        return self._gone(instance_id, final[0])
                    now = time.time()
                    bill = pod_bill(found[0], now)
                    final[0] = Bill(bill.started_at, float(int(now)), bill.cost_usd) if bill else None
                elif final[0] is None:
                    return self._gone(instance_id, None)
            try:
                await self.client.query("terminate", generate_pod_terminate_mutation(pid))
            except PermanentError as exc:
                if not is_not_found(exc):
                    raise
            return self._gone(instance_id, final[0])

        return await self.client.retrying("terminate", attempt)

    def _gone(self, instance_id: str, bill: Bill | None) -> Bill | None:
        self._regions.pop(instance_id, None)
        return bill

    # ------------------------------------------------------------------ volumes

    async def _volumes(self) -> list[dict[str, Any]]:
        data = await self.client.query("list volumes", VOLUMES_QUERY)
        vols = (data.get("myself") or {}).get("networkVolumes") or []
        return [v for v in vols if isinstance(v, dict) and v.get("id")]

    @staticmethod
    def _volume(v: dict[str, Any]) -> ProviderVolume:
        return ProviderVolume(PROVIDER, str(v["id"]), str(v.get("name") or ""),
                              str(v.get("dataCenterId") or ""), int(v.get("size") or 0))

    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        async def attempt() -> ProviderVolume:
            for v in await self._volumes():
                if v.get("name") == name and v.get("dataCenterId") == region:
                    return self._volume(v)
            text = (
                f'mutation {{ createNetworkVolume(input: {{name: "{gql_string(name)}", '
                f'size: {int(size_gb)}, dataCenterId: "{gql_string(region)}"}}) '
                "{ id name size dataCenterId } }"
            )
            data = await self.client.query("create volume", text)
            created = data.get("createNetworkVolume")
            if not isinstance(created, dict) or not created.get("id"):
                raise PermanentError("RunPod create volume: no volume returned", provider=PROVIDER)
            return self._volume(created)

        async with self._volume_lock:
            return await self.client.retrying("ensure volume", attempt)

    async def delete_volume(self, volume_id: str) -> None:
        text = f'mutation {{ deleteNetworkVolume(input: {{id: "{gql_string(volume_id)}"}}) }}'

        async def attempt() -> None:
            try:
                await self.client.query("delete volume", text)
            except PermanentError:
                if any(str(v["id"]) == volume_id for v in await self._volumes()):
                    raise

        async with self._volume_lock:
            await self.client.retrying("delete volume", attempt)
