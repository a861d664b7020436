"""The REST v2 transport (the default, `api = "rest"`): RunPod's current API at {api_url}/v2,
over the shared native async HTTP client.

Paths and fields follow RunPod's v2 reference (pods, network volumes, the GPU catalogue with
availability); where v2 is not documented the v1 names are used and marked *inferred* here, as in
the simulator (simulators/runpod/rest.py), so both can be corrected together:

* `POST /v2/pods` {"name", "image", "gpu": {"typeIds", "count", "minCudaVersion"}, "cloudType",
  "dataCenterIds" (Secure) or "countryCodes" (Community), "disk", "env": {..},
  "dockerEntrypoint", "dockerStartCmd", "mounts": {"network": [{"volumeId", "path"}]}};
  the `gpu` object and `mounts` are v2's, cloudType / dataCenterIds / countryCodes /
  dockerEntrypoint / dockerStartCmd are v1 names (*inferred* for v2). RunPod rejects unknown
  fields, so nothing else is sent.
* `GET /v2/pods` lists every pod (a bare array, or {"items"|"pods"|"data": [...]}: both read).
* lifecycle through `POST /v2/pods/{id}/actions/{stop|terminate}`.
* `GET|POST /v2/networkvolumes`, `DELETE /v2/networkvolumes/{id}`.
* offers: `GET /v2/catalog/gpus?include=AVAILABILITY&product=POD`.

Errors are RFC 9457 problem+json: 401/403 -> AuthError; 429 -> RetryLater after Retry-After;
5xx -> RetryLater; RunPod's no-capacity words -> NoCapacity; 404 -> PermanentError saying "not
found"; other 4xx -> PermanentError with the problem's detail. There is no spot here (v2 has no
bid): a spot offer cannot reach this transport.
"""

from __future__ import annotations

import json
import time
from typing import Any

from adapters.base import AuthError, NoCapacity, PermanentError, RetryLater
from adapters.runpod.client import NO_CAPACITY, PROVIDER, TRANSIENT, is_not_found
from adapters.runpod.offers import parse_catalog
from adapters.runpod.status import rest_instance
from adapters.runpod.transport import CreatePod, Transport
from orchestrator.models import Instance, Offer, ProviderVolume


def _items(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        body = next((body[k] for k in ("items", "pods", "data", "networkVolumes") if isinstance(body.get(k), list)), [])
    return [x for x in body if isinstance(x, dict) and x.get("id")] if isinstance(body, list) else []


class RestTransport(Transport):
    api = "rest"

    async def call(self, what: str, method: str, path: str, body: dict[str, Any] | None = None,
                   params: dict[str, str] | None = None) -> Any:
        """One REST request; its JSON body (None for 204), or an adapter error."""
        status, retry_after, raw = await self.client.send(
            what, method, f"{self.client.settings.api_url}/v2{path}",
            json.dumps(body) if body is not None else None, params)
        return self.answer(what, status, raw, retry_after)

    def answer(self, what: str, status: int, raw: bytes, retry_after: str) -> Any:
        scrub = self.client.scrub
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text) if text.strip() else None
        except ValueError:
            body = None
        if status < 300:
            if body is None and status != 204:
                raise RetryLater(f"RunPod {what}: HTTP {status} without a JSON body", provider=PROVIDER)
            return body
        detail = ""
        if isinstance(body, dict):
            detail = str(body.get("detail") or body.get("title") or body.get("error") or "")
        detail = scrub(" ".join((detail or text).split())[:300])
        if status in (401, 403):
            raise AuthError(f"RunPod {what}: the API key was refused (HTTP {status})", provider=PROVIDER)
        if status == 429 or status >= 500:
            raise RetryLater(f"RunPod {what}: HTTP {status} {detail}".rstrip(), provider=PROVIDER,
                             delay=self.client.delay(retry_after))
        if NO_CAPACITY.search(detail):
            raise NoCapacity(f"RunPod {what}: {detail}", provider=PROVIDER)
        if status == 404:
            raise PermanentError(f"RunPod {what}: not found (HTTP 404) {detail}".rstrip(), provider=PROVIDER)
        if TRANSIENT.search(detail):
            raise RetryLater(f"RunPod {what}: HTTP {status} {detail}", provider=PROVIDER)
        raise PermanentError(f"RunPod {what}: HTTP {status} {detail}".rstrip(), provider=PROVIDER)

    # ------------------------------------------------------------------ offers

    async def offers(self, data_centers: list[str] | None, clouds: list[str], interruptible: bool,
                     max_gpu_count: int, max_disk_gb: int) -> list[Offer]:
        body = await self.call("offers", "GET", "/catalog/gpus",
                               params={"include": "AVAILABILITY", "product": "POD"})
        offers = parse_catalog(_items(body), self.client.settings)
        countries = self.client.settings.countries
        if countries is not None:
            offers = [o for o in offers if o.supports_volumes or o.region in countries]
        return offers

    # ------------------------------------------------------------------ pods

    async def pods(self, known_regions: dict[str, str]) -> list[Instance]:
        now = time.time()
        return [rest_instance(p, known_regions, now) for p in _items(await self.call("list pods", "GET", "/pods"))]

    async def create(self, spec: CreatePod) -> Instance:
        key = spec.key
        if spec.bid_per_gpu is not None:
            raise PermanentError("RunPod's REST API has no interruptible pods (spot ended in "
                                 "September 2026)", provider=PROVIDER)
        gpu: dict[str, Any] = {"typeIds": [key.gpu_type_id], "count": key.gpu_count}
        if spec.min_cuda:
            gpu["minCudaVersion"] = spec.min_cuda
        body: dict[str, Any] = {
            "name": spec.name, "image": spec.image, "gpu": gpu, "cloudType": key.cloud,
            "disk": spec.container_disk_gb, "env": dict(spec.env),
            "dockerEntrypoint": list(spec.entrypoint), "dockerStartCmd": list(spec.cmd),
        }
        if key.data_center:
            body["dataCenterIds"] = [key.data_center]
        if key.country:
            body["countryCodes"] = [key.country]
        if spec.volume_id:
            body["mounts"] = {"network": [{"volumeId": spec.volume_id, "path": spec.mount_path}]}
        pod = await self.call("launch", "POST", "/pods", body)
        if not isinstance(pod, dict) or not pod.get("id"):
            raise NoCapacity("RunPod launch: no pod was returned", provider=PROVIDER)
        made = rest_instance(pod, {str(pod["id"]): key.place}, time.time())
        made.region = made.region or key.place
        return made

    async def _action(self, what: str, pod_id: str, action: str) -> dict[str, Any] | None:
        try:
            pod = await self.call(what, "POST", f"/pods/{_segment(pod_id)}/actions/{action}")
        except PermanentError as exc:
            if is_not_found(exc):
                return None
            raise
        return pod if isinstance(pod, dict) and pod.get("id") else None

    async def stop(self, pod_id: str) -> Instance | None:
        pod = await self._action("terminate (stop)", pod_id, "stop")
        return rest_instance(pod, {}, time.time()) if pod else None

    async def delete(self, pod_id: str) -> None:
        await self._action("terminate", pod_id, "terminate")

    # ------------------------------------------------------------------ volumes

    async def volumes(self) -> list[ProviderVolume]:
        return [_volume(v) for v in _items(await self.call("list volumes", "GET", "/networkvolumes"))]

    async def create_volume(self, name: str, size_gb: int, data_center: str) -> ProviderVolume:
        created = await self.call("create volume", "POST", "/networkvolumes",
                                  {"name": name, "size": int(size_gb), "dataCenterId": data_center})
        if not isinstance(created, dict) or not created.get("id"):
            raise PermanentError("RunPod create volume: no volume returned", provider=PROVIDER)
        return _volume(created)

    async def delete_volume(self, volume_id: str) -> None:
        await self.call("delete volume", "DELETE", f"/networkvolumes/{_segment(volume_id)}")

    async def verify(self) -> str:
        body = await self.call("verify", "GET", "/catalog/gpus", params={"product": "POD"})
        return f"account ok, {len(_items(body))} GPU types (REST v2)"


def _segment(value: str) -> str:
    """An id as one URL path segment: RunPod ids are [a-z0-9]; anything else is refused here."""
    if not value or not value.isalnum() or not value.isascii():
        raise PermanentError(f"no pod or volume with id {value[:40]!r} can exist (not a RunPod id)",
                             provider=PROVIDER)
    return value


def _volume(v: dict[str, Any]) -> ProviderVolume:
    return ProviderVolume(PROVIDER, str(v["id"]), str(v.get("name") or ""),
                          str(v.get("dataCenterId") or ""), int(v.get("size") or 0))
