"""gpuhop's RunPod provider: offers from GraphQL, pods launched through the `runpod` SDK, one
listing call per tick, network volumes per data center.

Launch is idempotent by pod name (the listing is checked before each create, also on retries);
the job's command runs under the gpuhop agent (`cloud_bootstrap`) with GPUHOP_LINGER=1 so that
RunPod does not restart the container when the job ends. Every string that goes into the SDK's
inline query text is escaped with `gql_string`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import runpod

from adapters.base import (
    Adapter,
    AdapterContext,
    NoCapacity,
    PermanentError,
    VolumeSupport,
)
from adapters.runpod.client import PROVIDER, RunPodClient, gql_string
from adapters.runpod.offers import DATA_CENTERS_QUERY, OfferKey, offers_query, parse_offers
from adapters.runpod.settings import RunPodSettings
from adapters.runpod.status import pod_region, to_instance
from orchestrator.agent import cloud_bootstrap
from orchestrator.models import Instance, InstanceState, LaunchRequest, Offer, ProviderVolume

PODS_QUERY = (
    "query Pods { myself { pods { id name desiredStatus lastStatusChange costPerHr gpuCount "
    "podType networkVolumeId uptimeSeconds runtime { uptimeInSeconds } "
    "machine { gpuDisplayName location } } networkVolumes { id name size dataCenterId } } }"
)
VOLUMES_QUERY = "query Volumes { myself { networkVolumes { id name size dataCenterId } } }"
POD_FIELDS = "id name desiredStatus lastStatusChange costPerHr machine { location }"


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
        prefix = f"{self.ctx.prefix}-"
        return [
            to_instance(p, pod_region(p, self._regions, volume_dcs))
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

        async def attempt() -> Instance:
            pods, volume_dcs = await self._listing()
            for inst in self._ours(pods, volume_dcs):
                if inst.name == req.name and inst.state != InstanceState.TERMINATED:
                    return inst
            return await self._create(req, key)

        return await self.client.retrying("launch", attempt)

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
            pod = await self.client.call(
                "launch", runpod.create_pod,
                name=gql_string(req.name),
                image_name=gql_string(req.image),
                gpu_type_id=gql_string(key.gpu_type_id),
                cloud_type=key.cloud,
                data_center_id=gql_string(key.data_center),
                gpu_count=key.gpu_count,
                volume_in_gb=0,
                container_disk_in_gb=min(req.disk_gb, self.settings.max_container_disk_gb),
                docker_args=gql_string(shell),
                volume_mount_path=gql_string(req.mount_path),
                env={gql_string(k): gql_string(v) for k, v in env.items()},
                network_volume_id=gql_string(volume_id) if volume_id else None,
            )
        if not isinstance(pod, dict) or not pod.get("id"):
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

    async def terminate(self, instance_id: str) -> None:
        text = f'mutation {{ podTerminate(input: {{podId: "{gql_string(instance_id)}"}}) }}'

        async def attempt() -> None:
            try:
                await self.client.query("terminate", text)
            except PermanentError:
                pods, _ = await self._listing()
                if any(str(p.get("id")) == instance_id and p.get("desiredStatus") != "TERMINATED"
                       for p in pods):
                    raise
            self._regions.pop(instance_id, None)

        await self.client.retrying("terminate", attempt)

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
