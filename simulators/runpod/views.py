"""How the RunPod simulator shows its state: GraphQL objects (GPU types with lowestPrice, data
centers, pods) shaped as RunPod returns them, and the admin API's view of a pod.

Read-only functions of a `World`, kept apart from the code that changes it.
"""

from __future__ import annotations

import time
from typing import Any

from simulators.runpod.catalog import CLOUD_TYPES, GpuType
from simulators.runpod.world import SECRET_ENV_MARKERS, Pod, World, iso_time


def _stock(free: int, need: int = 1) -> str | None:
    return None if free < max(1, need) else "Low" if free <= 2 else "Medium" if free <= 7 else "High"


def lowest_price(w: World, gpu: GpuType, inp: dict[str, Any] | None) -> dict[str, Any]:
    inp = inp or {}
    count = max(1, int(inp.get("gpuCount") or 1))
    secure = inp.get("secureCloud")
    clouds = [c for c in CLOUD_TYPES if secure is None or (c == "SECURE") == bool(secure)]
    dcs = [inp["dataCenterId"]] if inp.get("dataCenterId") else list(w.catalog.data_centers)
    if inp.get("dataCenterId"):
        clouds = [c for c in clouds if c == "SECURE"]  # Community Cloud is not pinned to a data center
    if inp.get("countryCode"):
        dcs = [d for d in dcs if d in w.catalog.in_country(str(inp["countryCode"]))]
    min_cuda = inp.get("minCudaVersion")
    spot_ok = w.settings.interruptible
    fits = gpu.vcpu_per_gpu * count >= int(inp.get("minVcpuCount") or 0) and (
        gpu.memory_per_gpu_gb * count >= int(inp.get("minMemoryInGb") or 0)
    )
    frees: list[tuple[str, int]] = []  # (cloud, free) over every matching place
    for dc in dcs:
        for cloud in clouds:
            if gpu.price(cloud) is not None or gpu.price(cloud, spot=True) is not None:
                frees.append((cloud, w.catalog.free(dc, gpu.id, cloud, min_cuda) if fits else 0))
    on_demand = [gpu.price(c) for c, f in frees if f >= count and gpu.price(c) is not None]
    spot = [gpu.price(c, True) for c, f in frees if f >= count and spot_ok and gpu.price(c, True) is not None]
    most = max((f for _, f in frees), default=0)
    counts = [n for n in range(1, gpu.max_gpu_count + 1) if n <= most]
    return {
        "gpuName": gpu.display_name,
        "gpuTypeId": gpu.id,
        "minimumBidPrice": min(x for x in spot if x is not None) if spot else None,
        "uninterruptablePrice": min(x for x in on_demand if x is not None) if on_demand else None,
        "minMemory": gpu.memory_per_gpu_gb * count,
        "minVcpu": gpu.vcpu_per_gpu * count,
        "stockStatus": _stock(most, count),
        "maxUnreservedGpuCount": sum(f for _, f in frees),
        "availableGpuCounts": counts,
        "supportPublicIp": True,
        "compliance": [],
    }

def gpu_type_view(w: World, gpu: GpuType) -> dict[str, Any]:
    spot = w.settings.interruptible
    return {
        "id": gpu.id,
        "displayName": gpu.display_name,
        "manufacturer": gpu.manufacturer,
        "memoryInGb": gpu.memory_gb,
        "secureCloud": gpu.price("SECURE") is not None,
        "communityCloud": gpu.price("COMMUNITY") is not None,
        "securePrice": gpu.price("SECURE"),
        "communityPrice": gpu.price("COMMUNITY"),
        "secureSpotPrice": gpu.price("SECURE", True) if spot else None,
        "communitySpotPrice": gpu.price("COMMUNITY", True) if spot else None,
        "maxGpuCount": gpu.max_gpu_count,
        "maxGpuCountSecureCloud": gpu.max_gpu_count if gpu.price("SECURE") else 0,
        "maxGpuCountCommunityCloud": gpu.max_gpu_count if gpu.price("COMMUNITY") else 0,
        "minPodGpuCount": 1,
        "lowestPrice": lambda _info, input=None: lowest_price(w, gpu, input),
    }

def data_center_view(w: World, dc_id: str) -> dict[str, Any]:
    dc = w.catalog.data_centers[dc_id]
    avail = []
    for gpu in w.catalog.gpu_types.values():
        free = sum(w.catalog.free(dc_id, gpu.id, c) for c in CLOUD_TYPES)
        avail.append({
            "id": gpu.id, "gpuTypeId": gpu.id, "gpuTypeDisplayName": gpu.display_name,
            "displayName": gpu.display_name, "stockStatus": _stock(free), "available": free > 0,
        })
    return {
        "id": dc.id, "name": dc.name, "location": dc.location, "countryCode": dc.country,
        "storageSupport": True, "listed": True, "gpuAvailability": avail,
    }


def pod_view(w: World, pod: Pod) -> dict[str, Any]:
    up = pod.started_at is not None and w.runtime.running(pod.id)
    uptime = int(time.time() - pod.started_at) if up and pod.started_at else 0
    runtime = None
    if up:
        runtime = {
            "uptimeInSeconds": uptime,
            "ports": [],
            "gpus": [{"id": f"GPU-{pod.id}-{i}", "gpuUtilPercent": 0, "memoryUtilPercent": 0}
                     for i in range(pod.gpu_count)],
            "container": {"cpuPercent": 0, "memoryPercent": 0},
        }
    vol = w.volumes.get(pod.network_volume or "")
    return {
        "id": pod.id,
        "name": pod.name,
        "desiredStatus": pod.desired,
        "lastStatusChange": pod.last_status_change,
        "lastStartedAt": iso_time(pod.last_started_at),
        "costPerHr": pod.cost_per_hr,
        "adjustedCostPerHr": pod.cost_per_hr,
        "gpuCount": pod.gpu_count,
        "vcpuCount": float(pod.gpu.vcpu_per_gpu * pod.gpu_count),
        "memoryInGb": float(pod.gpu.memory_per_gpu_gb * pod.gpu_count),
        "containerDiskInGb": pod.container_disk_gb,
        "volumeInGb": float(pod.volume_gb),
        "volumeMountPath": pod.volume_mount_path,
        "volumeEncrypted": False,
        "imageName": pod.image,
        "dockerArgs": pod.docker_args,
        "dockerId": None,
        "env": [f"{k}={v}" for k, v in pod.env],
        "machineId": pod.machine_id,
        "podType": "INTERRUPTABLE" if pod.interruptible else "RESERVED",
        "port": None,
        "ports": "",
        "uptimeSeconds": uptime,
        "networkVolumeId": pod.network_volume,
        "networkVolume": vol.view() if vol else None,
        "templateId": None,
        "version": pod.generation,
        "locked": False,
        "lowestBidPriceToResume": pod.gpu.price(pod.cloud, True) if pod.interruptible else None,
        "runtime": runtime,
        "machine": {
            "id": pod.machine_id,
            "podHostId": f"{pod.id}-{pod.machine_id[:8]}",
            "gpuDisplayName": pod.gpu.display_name,
            "gpuTypeId": pod.gpu.id,
            "location": pod.location,
            "dataCenterId": pod.data_center if pod.cloud == "SECURE" else None,
            "secureCloud": pod.cloud == "SECURE",
            "maxDownloadSpeedMbps": 1000,
            "maxUploadSpeedMbps": 1000,
            "costPerHr": pod.cost_per_hr,
        },
    }

def admin_view(w: World, pod: Pod, terminated: bool = False) -> dict[str, Any]:
    machine = w.runtime.machines.get(pod.id)
    return {
        "id": pod.id,
        "name": pod.name,
        "desiredStatus": "TERMINATED" if terminated else pod.desired,
        "lastStatusChange": pod.last_status_change,
        "lastStartedAt": pod.last_started_at,
        "stoppedAt": pod.stopped_at,
        "gpuTypeId": pod.gpu.id,
        "gpuCount": pod.gpu_count,
        "cloudType": pod.cloud,
        "dataCenterId": pod.data_center,
        "countryCode": pod.country,
        "hostCuda": pod.host_cuda,
        "image": pod.image,
        "entrypoint": pod.entrypoint,
        "cmd": pod.cmd,
        "interruptible": pod.interruptible,
        "costPerHr": pod.cost_per_hr,
        "networkVolumeId": pod.network_volume,
        "volumeDir": str(w.runtime.volume_dir(pod.volume_key)),
        "processRunning": w.runtime.running(pod.id),
        "pid": machine.proc.pid if machine else None,
        "exitCode": machine.exit_code if machine else None,
        "restarts": pod.restarts,
        "env": {
            k: ("***" if any(m in k.upper() for m in SECRET_ENV_MARKERS) else v)
            for k, v in pod.env
        },
    }
