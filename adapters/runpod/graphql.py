"""The GraphQL transport (`api = "graphql"`): RunPod's deprecated GraphQL API, as the `runpod`
SDK speaks it, over the shared native async HTTP client. Kept until RunPod retires GraphQL
(announced for early 2027).

The wire stays the SDK's: `POST {api_url}/graphql`, body `{"query": ...}`, `Authorization: Bearer
<key>`, and the create mutation from the SDK's own generator, every string escaped with
`gql_string` (the SDK pastes strings into the query text). Errors come back as HTTP 200 with an
`errors` list: the no-capacity message -> NoCapacity, "something went wrong" -> RetryLater,
anything else -> PermanentError; HTTP 401 -> AuthError; 429 and 5xx -> RetryLater.

Late-2026 RunPod: Community pods are chosen by `countryCode`, never `dataCenterId` (a pinned
Community launch finds nothing); the host CUDA filter is `allowedCudaVersions` (what the SDK's
generator writes); the start command travels in `dockerArgs` as JSON `{"cmd": [...],
"entrypoint": [...]}`, which replaces the image's ENTRYPOINT. Interruptible pods
(`podRentInterruptable`) are only used when the `interruptible` setting opts in.
"""

from __future__ import annotations

import json
import time
from typing import Any

from runpod.api.mutations.pods import (
    generate_pod_deployment_mutation,
    generate_pod_terminate_mutation,
)

from adapters.base import AuthError, NoCapacity, PermanentError, RetryLater
from adapters.runpod.client import NO_CAPACITY, PROVIDER, TRANSIENT, gql_string, is_not_found
from adapters.runpod.offers import DATA_CENTERS_QUERY, offers_query, parse_offers
from adapters.runpod.status import pod_region, to_instance
from adapters.runpod.transport import CreatePod, Transport, allowed_cuda
from orchestrator.models import Instance, InstanceState, Offer, ProviderVolume

BILL_FIELDS = "desiredStatus lastStatusChange lastStartedAt costPerHr"
PODS_QUERY = (
    f"query Pods {{ myself {{ pods {{ id name {BILL_FIELDS} gpuCount "
    "podType networkVolumeId uptimeSeconds runtime { uptimeInSeconds } "
    "machine { gpuDisplayName location } } networkVolumes { id name size dataCenterId } } }"
)
VOLUMES_QUERY = "query Volumes { myself { networkVolumes { id name size dataCenterId } } }"
POD_FIELDS = "id name desiredStatus lastStatusChange costPerHr machine { location }"


def start_command(spec: CreatePod) -> str:
    """dockerArgs as RunPod's JSON start command (replaces the image's ENTRYPOINT)."""
    return json.dumps({"cmd": spec.cmd, "entrypoint": spec.entrypoint})


class GraphQLTransport(Transport):
    api = "graphql"

    async def query(self, what: str, text: str) -> dict[str, Any]:
        """Run GraphQL `text` once, as the SDK would send it; returns its `data` object."""
        status, retry_after, raw = await self.client.send(
            what, "POST", f"{self.client.settings.api_url}/graphql", json.dumps({"query": text}))
        return self.answer(what, status, raw, retry_after)

    def answer(self, what: str, status: int, raw: bytes, retry_after: str) -> dict[str, Any]:
        """Map one HTTP answer to its data or to an adapter error (pure, apart from the key)."""
        scrub = self.client.scrub
        if status in (401, 403):
            raise AuthError(f"RunPod {what}: the API key was refused (HTTP {status})", provider=PROVIDER)
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if status == 429 or status >= 500 or not isinstance(body, dict):
            snippet = " ".join(text.split())[:200]
            raise RetryLater(f"RunPod {what}: HTTP {status} {scrub(snippet)}".rstrip(),
                             provider=PROVIDER, delay=self.client.delay(retry_after))
        errors = body.get("errors")
        if errors:
            first = errors[0] if isinstance(errors, list) and errors else {}
            message = scrub(str(first.get("message") if isinstance(first, dict) else first))
            if NO_CAPACITY.search(message):
                raise NoCapacity(f"RunPod {what}: {message}", provider=PROVIDER)
            if TRANSIENT.search(message):
                raise RetryLater(f"RunPod {what}: {message}", provider=PROVIDER)
            raise PermanentError(f"RunPod {what}: {message}", provider=PROVIDER)
        if status >= 400:
            raise PermanentError(f"RunPod {what}: HTTP {status}", provider=PROVIDER)
        data = body.get("data")
        if not isinstance(data, dict):
            raise RetryLater(f"RunPod {what}: response without data", provider=PROVIDER)
        return data

    # ------------------------------------------------------------------ offers

    async def offers(self, data_centers: list[str] | None, clouds: list[str], interruptible: bool,
                     max_gpu_count: int, max_disk_gb: int) -> list[Offer]:
        settings = self.client.settings
        data = await self.query("dataCenters", DATA_CENTERS_QUERY)
        listed = [d for d in data.get("dataCenters") or [] if isinstance(d, dict) and d.get("id")]
        dcs = data_centers if data_centers is not None else [str(d["id"]) for d in listed]
        countries = settings.countries if settings.countries is not None else sorted(
            {str(d["countryCode"]) for d in listed if d.get("countryCode")})
        text, aliases = offers_query(dcs, countries, clouds)
        if not aliases:
            return []
        data = await self.query("gpuTypes", text)
        return parse_offers(data.get("gpuTypes"), aliases, settings)

    # ------------------------------------------------------------------ pods

    async def pods(self, known_regions: dict[str, str]) -> list[Instance]:
        data = await self.query("list pods", PODS_QUERY)
        myself = data.get("myself") or {}
        volume_dcs = {
            str(v["id"]): str(v.get("dataCenterId") or "")
            for v in myself.get("networkVolumes") or [] if isinstance(v, dict) and v.get("id")
        }
        now = time.time()
        return [
            to_instance(p, pod_region(p, known_regions, volume_dcs), now)
            for p in myself.get("pods") or [] if isinstance(p, dict) and p.get("id")
        ]

    async def create(self, spec: CreatePod) -> Instance:
        key = spec.key
        env = {gql_string(k): gql_string(v) for k, v in spec.env.items()}
        if spec.bid_per_gpu is not None:
            pod = await self._rent_interruptable(spec, env)
        else:
            # the SDK's create_pod, minus its gpuTypes pre-check (RunPod refuses an unknown type
            # in the mutation itself) and its volume lookup (the offer names the data center)
            text = generate_pod_deployment_mutation(
                name=gql_string(spec.name),
                image_name=gql_string(spec.image),
                gpu_type_id=gql_string(key.gpu_type_id),
                cloud_type=key.cloud,
                data_center_id=gql_string(key.data_center) if key.data_center else None,
                country_code=gql_string(key.country) if key.country else None,
                gpu_count=key.gpu_count,
                volume_in_gb=0,
                container_disk_in_gb=spec.container_disk_gb,
                min_vcpu_count=1,
                min_memory_in_gb=1,
                docker_args=gql_string(start_command(spec)),
                volume_mount_path=gql_string(spec.mount_path),
                env=env,
                network_volume_id=gql_string(spec.volume_id) if spec.volume_id else None,
                allowed_cuda_versions=allowed_cuda(spec.min_cuda) if spec.min_cuda else None,
            )
            data = await self.query("launch", text)
            created = data.get("podFindAndDeployOnDemand")
            pod = created if isinstance(created, dict) else {}
        if not pod.get("id"):
            raise NoCapacity("RunPod launch: no pod was returned", provider=PROVIDER)
        return Instance(provider=PROVIDER, instance_id=str(pod["id"]), name=spec.name,
                        state=InstanceState.PENDING, region=key.place,
                        reason=str(pod.get("lastStatusChange") or ""))

    async def _rent_interruptable(self, spec: CreatePod, env: dict[str, str]) -> dict[str, Any]:
        key = spec.key
        env_items = ", ".join(f'{{key: "{k}", value: "{v}"}}' for k, v in env.items())
        fields = [
            f"bidPerGpu: {spec.bid_per_gpu:.6f}",
            f'name: "{gql_string(spec.name)}"',
            f'imageName: "{gql_string(spec.image)}"',
            f"cloudType: {key.cloud}",
            f'gpuTypeId: "{gql_string(key.gpu_type_id)}"',
            f"gpuCount: {key.gpu_count}",
            f"containerDiskInGb: {spec.container_disk_gb}",
            "volumeInGb: 0",
            f'dockerArgs: "{gql_string(start_command(spec))}"',
            f'volumeMountPath: "{gql_string(spec.mount_path)}"',
            f"env: [{env_items}]",
        ]
        if key.data_center:
            fields.append(f'dataCenterId: "{gql_string(key.data_center)}"')
        if key.country:
            fields.append(f'countryCode: "{gql_string(key.country)}"')
        if spec.volume_id:
            fields.append(f'networkVolumeId: "{gql_string(spec.volume_id)}"')
        if spec.min_cuda:
            fields.append("allowedCudaVersions: [" + ", ".join(f'"{v}"' for v in allowed_cuda(spec.min_cuda)) + "]")
        text = f"mutation {{ podRentInterruptable(input: {{{', '.join(fields)}}}) {{ {POD_FIELDS} }} }}"
        data = await self.query("launch (spot)", text)
        pod = data.get("podRentInterruptable")
        return pod if isinstance(pod, dict) else {}

    async def stop(self, pod_id: str) -> Instance | None:
        text = f'mutation {{ podStop(input: {{podId: "{gql_string(pod_id)}"}}) {{ id name {BILL_FIELDS} }} }}'
        try:
            data = await self.query("terminate (stop)", text)
        except PermanentError as exc:
            if is_not_found(exc):
                return None
            raise
        pod = data.get("podStop")
        if not isinstance(pod, dict) or not pod.get("id"):
            return None
        return to_instance(pod, "", time.time())

    async def delete(self, pod_id: str) -> None:
        try:
            await self.query("terminate", generate_pod_terminate_mutation(gql_string(pod_id)))
        except PermanentError as exc:
            if not is_not_found(exc):
                raise

    # ------------------------------------------------------------------ volumes

    async def volumes(self) -> list[ProviderVolume]:
        data = await self.query("list volumes", VOLUMES_QUERY)
        vols = (data.get("myself") or {}).get("networkVolumes") or []
        return [_volume(v) for v in vols if isinstance(v, dict) and v.get("id")]

    async def create_volume(self, name: str, size_gb: int, data_center: str) -> ProviderVolume:
        text = (
            f'mutation {{ createNetworkVolume(input: {{name: "{gql_string(name)}", '
            f'size: {int(size_gb)}, dataCenterId: "{gql_string(data_center)}"}}) '
            "{ id name size dataCenterId } }"
        )
        created = (await self.query("create volume", text)).get("createNetworkVolume")
        if not isinstance(created, dict) or not created.get("id"):
            raise PermanentError("RunPod create volume: no volume returned", provider=PROVIDER)
        return _volume(created)

    async def delete_volume(self, volume_id: str) -> None:
        await self.query("delete volume",
                         f'mutation {{ deleteNetworkVolume(input: {{id: "{gql_string(volume_id)}"}}) }}')

    async def verify(self) -> str:
        data = await self.query("verify", "query Verify { gpuTypes { id } }")
        return f"account ok, {len(data.get('gpuTypes') or [])} GPU types (GraphQL)"


def _volume(v: dict[str, Any]) -> ProviderVolume:
    return ProviderVolume(PROVIDER, str(v["id"]), str(v.get("name") or ""),
                          str(v.get("dataCenterId") or ""), int(v.get("size") or 0))
