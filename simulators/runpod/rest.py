"""RunPod's REST API v2, as the simulator serves it beside GraphQL over the same `World`.

Modelled on RunPod's published v2 reference (pods, network volumes, the GPU catalogue with
availability) and its v1 field names where v2 is not documented. What is *inferred* (not
documented) is marked so here and kept small:

    GET  /v2/pods                           -> [pod, ...]                (bare array, as v1)
    POST /v2/pods                           -> 201 pod
         {"name", "image", "gpu": {"typeIds": [...], "count", "minCudaVersion"?},
          "cloudType": "SECURE"|"COMMUNITY", "dataCenterIds"?, "countryCodes"?, "disk"?,
          "env"?: {k: v}, "dockerEntrypoint"?: [...], "dockerStartCmd"?: [...], "args"?: str,
          "ports"?: [...], "mounts"?: {"network": [{"volumeId", "path"}]}}
         (gpu / cloudType / dataCenterIds / countryCodes / docker* placement inferred from v1)
    GET  /v2/pods/{id}                      -> pod, 404 once terminated (RunPod forgets it)
    POST /v2/pods/{id}/actions/{action}     -> pod; action = start | stop | restart | terminate
    GET  /v2/networkvolumes                 -> [volume, ...]
    POST /v2/networkvolumes                 -> 201 volume  {"name", "size", "dataCenterId"}
    DELETE /v2/networkvolumes/{id}          -> 204
    GET  /v2/catalog/gpus?include=AVAILABILITY&product=POD -> [gpu type with "availability"]

A pod: {"id", "name", "status" (PROVISIONING, STARTING, RUNNING, EXITED, ERROR, TERMINATED),
"statusMessage" (RunPod's words on a stop: inferred), "lastStatusChange" and "lastStartedAt"
(as v1), "costPerHr", "cloudType", "dataCenterId" (null on Community), "countryCode", "gpu",
"image", "dockerEntrypoint", "dockerStartCmd", "env", "mounts", "hostCudaVersion" (inferred)}.
An availability row: {"cloudType", "dataCenterId" (Secure) or "countryCode" (Community),
"stockStatus", "maxUnreservedGpuCount", "availableGpuCounts", "pricePerGpu",
"maxCudaVersion" (the newest host driver free there: inferred), "vcpuPerGpu", "memoryPerGpuGb"}.

Unknown request fields are refused (400). Every error is RFC 9457 problem+json
(`application/problem+json`, {"type", "title", "status", "detail"}); 429 carries Retry-After and
the RateLimit headers.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from simulators.runpod.catalog import CLOUD_TYPES, GpuType, cuda_tuple
from simulators.runpod.world import (
    DeployRequest,
    Pod,
    SimError,
    Volume,
    World,
    iso_time,
)

PROBLEM_BASE = "https://api.runpod.io/problems/"  # inferred: RunPod's problem type URIs
CREATE_FIELDS = {"name", "image", "gpu", "cloudType", "dataCenterIds", "countryCodes", "disk", "env",
                 "dockerEntrypoint", "dockerStartCmd", "args", "ports", "mounts"}
GPU_FIELDS = {"typeIds", "count", "minCudaVersion"}
MOUNT_FIELDS = {"network"}
NETWORK_MOUNT_FIELDS = {"volumeId", "path"}
VOLUME_FIELDS = {"name", "size", "dataCenterId"}
ACTIONS = ("start", "stop", "restart", "terminate")


def problem(status: int, detail: str, slug: str | None = None,
            headers: dict[str, str] | None = None) -> web.Response:
    title = HTTPStatus(status).phrase
    body = {"type": PROBLEM_BASE + (slug or title.lower().replace(" ", "-")), "title": title,
            "status": status, "detail": detail}
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json",
                        headers=headers)


def rate_limited(retry_after: int = 1, detail: str = "Too many requests.") -> web.Response:
    return problem(429, detail, "rate-limited", headers={
        "Retry-After": str(retry_after), "RateLimit-Limit": "100", "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(retry_after), "RateLimit-Policy": "100;w=10",
    })


class BadRequest(Exception):
    """A request the REST door refuses before the world sees it (400)."""


def _strs(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what} must be an array of strings")
    return list(value)


def _unknown(body: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadRequest(f"unknown field {where}{extra[0]!r}: not part of the request schema")


def create_request(body: Any) -> DeployRequest:
    """POST /v2/pods body -> DeployRequest; BadRequest for anything off the schema."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    _unknown(body, CREATE_FIELDS, "")
    name, image = body.get("name"), body.get("image")
    if not isinstance(name, str) or not name:
        raise BadRequest("name is required (a non-empty string)")
    if not isinstance(image, str) or not image:
        raise BadRequest("image is required (a string)")
    gpu = body.get("gpu")
    if not isinstance(gpu, dict):
        raise BadRequest("gpu is required for a GPU pod (an object)")
    _unknown(gpu, GPU_FIELDS, "gpu.")
    type_ids = _strs(gpu.get("typeIds"), "gpu.typeIds")
    count = gpu.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise BadRequest("gpu.count must be a positive integer")
    min_cuda = gpu.get("minCudaVersion")
    if min_cuda is not None:
        try:
            cuda_tuple(str(min_cuda))
        except ValueError:
            raise BadRequest("gpu.minCudaVersion must be a version such as '12.4'") from None
    cloud = body.get("cloudType", "SECURE")
    if cloud not in CLOUD_TYPES:
        raise BadRequest("cloudType must be SECURE or COMMUNITY")
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise BadRequest("env must be an object of strings")
    disk = body.get("disk", 50)
    if not isinstance(disk, int) or isinstance(disk, bool) or disk < 1:
        raise BadRequest("disk must be an integer >= 1")
    mounts = body.get("mounts") or {}
    if not isinstance(mounts, dict):
        raise BadRequest("mounts must be an object")
    _unknown(mounts, MOUNT_FIELDS, "mounts.")
    network = mounts.get("network") or []
    if not isinstance(network, list) or len(network) > 1:
        raise BadRequest("mounts.network takes at most one network volume")
    volume_id, path = None, "/workspace"
    for m in network:
        if not isinstance(m, dict):
            raise BadRequest("mounts.network[0] must be an object")
        _unknown(m, NETWORK_MOUNT_FIELDS, "mounts.network[0].")
        if not isinstance(m.get("volumeId"), str) or not isinstance(m.get("path", "/workspace"), str):
            raise BadRequest("mounts.network[0] needs volumeId and path (strings)")
        volume_id, path = m["volumeId"], m.get("path", "/workspace")
    args = body.get("args", "")
    if not isinstance(args, str):
        raise BadRequest("args must be a string")
    return DeployRequest(
        name=name, image=image, gpu_type_ids=type_ids, gpu_count=count, cloud=cloud,
        data_centers=_strs(body["dataCenterIds"], "dataCenterIds") if body.get("dataCenterIds") else None,
        countries=_strs(body["countryCodes"], "countryCodes") if body.get("countryCodes") else None,
        network_volume=volume_id, mount_path=path, container_disk_gb=disk,
        env=list(env.items()), docker_args=args,
        entrypoint=_strs(body["dockerEntrypoint"], "dockerEntrypoint") if "dockerEntrypoint" in body else None,
        cmd=_strs(body["dockerStartCmd"], "dockerStartCmd") if "dockerStartCmd" in body else None,
        min_cuda=str(min_cuda) if min_cuda is not None else None,
    )


def volume_request(body: Any) -> tuple[str, int, str]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    _unknown(body, VOLUME_FIELDS, "")
    name, size, dc = body.get("name"), body.get("size"), body.get("dataCenterId")
    if not isinstance(name, str) or not isinstance(dc, str) or not isinstance(size, int) or isinstance(size, bool):
        raise BadRequest("name (string), size (integer) and dataCenterId (string) are required")
    return name, size, dc


# ---------------------------------------------------------------------- views


def pod_view(w: World, pod: Pod, terminated: bool = False) -> dict[str, Any]:
    up = pod.started_at is not None and w.runtime.running(pod.id)
    return {
        "id": pod.id,
        "name": pod.name,
        "status": "TERMINATED" if terminated else pod.rest_status(up),
        "statusMessage": pod.status_message or None,
        "lastStatusChange": pod.last_status_change,
        "lastStartedAt": iso_time(pod.last_started_at),
        "costPerHr": pod.cost_per_hr,
        "cloudType": pod.cloud,
        "dataCenterId": pod.data_center if pod.cloud == "SECURE" else None,
        "countryCode": pod.country,
        "gpu": {"typeId": pod.gpu.id, "count": pod.gpu_count, "displayName": pod.gpu.display_name},
        "image": pod.image,
        "dockerEntrypoint": pod.entrypoint or [],
        "dockerStartCmd": pod.cmd or [],
        "env": dict(pod.env),
        "mounts": {"network": [{"volumeId": pod.network_volume, "path": pod.volume_mount_path}]
                   if pod.network_volume else []},
        "hostCudaVersion": pod.host_cuda,
        "uptimeSeconds": 0,
    }


def volume_view(v: Volume) -> dict[str, Any]:
    return {"id": v.id, "name": v.name, "size": v.size, "dataCenterId": v.data_center}


def _stock(free: int) -> str | None:
    return None if free < 1 else "Low" if free <= 2 else "Medium" if free <= 7 else "High"


def catalog_gpu(w: World, gpu: GpuType, availability: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": gpu.id, "displayName": gpu.display_name, "manufacturer": gpu.manufacturer,
        "memoryInGb": gpu.memory_gb, "maxGpuCount": gpu.max_gpu_count,
        "securePrice": gpu.price("SECURE"), "communityPrice": gpu.price("COMMUNITY"),
    }
    if not availability:
        return out
    cat = w.catalog
    rows: list[dict[str, Any]] = []

    def row(cloud: str, where: dict[str, Any], dcs: list[str]) -> None:
        price = gpu.price(cloud)
        if price is None:
            return
        free = sum(cat.free(d, gpu.id, cloud) for d in dcs)
        newest = [cat.cuda if cat.free(d, gpu.id, cloud, cat.cuda) else cat.old_cuda for d in dcs
                  if cat.free(d, gpu.id, cloud)]
        most = max((cat.free(d, gpu.id, cloud) for d in dcs), default=0)
        rows.append({
            "cloudType": cloud, **where, "pricePerGpu": price, "stockStatus": _stock(free),
            "maxUnreservedGpuCount": free,
            "availableGpuCounts": [n for n in range(1, gpu.max_gpu_count + 1) if n <= most],
            "maxCudaVersion": max(newest, key=cuda_tuple) if newest else None,
            "vcpuPerGpu": gpu.vcpu_per_gpu, "memoryPerGpuGb": gpu.memory_per_gpu_gb,
        })

    for dc_id, dc in cat.data_centers.items():
        row("SECURE", {"dataCenterId": dc_id, "countryCode": dc.country}, [dc_id])
    for country in cat.countries():
        row("COMMUNITY", {"dataCenterId": None, "countryCode": country}, cat.in_country(country))
    out["availability"] = rows
    return out


# ---------------------------------------------------------------------- operations


def operation(method: str, path: str) -> str:
    """A REST request's operation name, for injected latency (as GraphQL root fields are)."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["v2", "pods"]:
        if len(parts) == 2:
            return "createPod" if method == "POST" else "listPods"
        if len(parts) == 5 and parts[3] == "actions":
            return f"{parts[4]}Pod"
        return "getPod"
    if parts[:2] == ["v2", "networkvolumes"]:
        return {"GET": "listNetworkVolumes", "POST": "createNetworkVolume"}.get(method, "deleteNetworkVolume")
    return "catalogGpus"


def run(w: World, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
    """Carry out one REST request on the world: (HTTP status, JSON body or None).
    Raises BadRequest, SimError or web.HTTPNotFound."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["v2", "pods"]:
        if len(parts) == 2 and method == "GET":
            return 200, [pod_view(w, p) for p in w.pods.values()]
        if len(parts) == 2 and method == "POST":
            return 201, pod_view(w, w.deploy(create_request(body)))
        pod_id = parts[2]
        if len(parts) == 3 and method == "GET":
            pod = w.pods.get(pod_id)
            if pod is None:
                raise SimError(f"Pod {pod_id} not found.", status=404)
            return 200, pod_view(w, pod)
        if len(parts) == 5 and parts[3] == "actions" and method == "POST" and parts[4] in ACTIONS:
            if body not in (None, {}):
                raise BadRequest("actions take no body")
            action = parts[4]
            if action == "terminate":
                pod = w.pods.get(pod_id)
                if pod is None:
                    raise SimError(f"Pod {pod_id} not found.", status=404)
                w.terminate(pod_id)
                return 200, pod_view(w, pod, terminated=True)
            if action == "stop":
                return 200, pod_view(w, w.stop(pod_id))
            if action == "restart":
                w.stop(pod_id)
            return 200, pod_view(w, w.resume(pod_id, None))
    if parts[:2] == ["v2", "networkvolumes"]:
        if len(parts) == 2 and method == "GET":
            return 200, [volume_view(v) for v in w.volumes.values()]
        if len(parts) == 2 and method == "POST":
            name, size, dc = volume_request(body)
            return 201, volume_view(w.create_volume(name, size, dc))
        if len(parts) == 3 and method == "DELETE":
            w.delete_volume(parts[2])
            return 204, None
    if parts == ["v2", "catalog", "gpus"] and method == "GET":
        include = {s.strip().upper() for s in query.get("include", "").split(",") if s.strip()}
        if query.get("product", "POD").upper() != "POD" or include - {"AVAILABILITY"}:
            raise BadRequest("product must be POD; include may be AVAILABILITY")
        return 200, [catalog_gpu(w, g, "AVAILABILITY" in include) for g in w.catalog.gpu_types.values()]
    raise web.HTTPNotFound()
