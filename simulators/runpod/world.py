"""What the RunPod simulator knows: pods, network volumes and capacity, and how they change.

The GraphQL resolvers and the admin API both act through `World`, so a pod behaves the same
whichever door a request came in by. A pod's container is a local process run by the shared
`Runtime`: it starts `start_delay` seconds after the pod is rented (`runtime` is null until
then), is restarted when its main process exits (as RunPod restarts containers), and holds its
GPUs (capacity) and bills by the second until it is stopped, preempted or terminated.

The one billing rule, which the ledger and every API answer follow: a pod is charged
`costPerHr` per second from the moment it was rented or resumed (`lastStartedAt`) until the
moment it stopped (the date in the `lastStatusChange` that stopped it: "Exited by user: <date>",
"Outbid: <date>", "Exited by Runpod: <date>", "Terminated by user: <date>"). RunPod states those
dates to the second, so both moments are whole seconds of the simulator's clock and the ledger
entry of the pod starts and stops at exactly those seconds; a resumed pod starts a new segment.
A pod the provider reclaims (`preempt`) says "Outbid: <date>", the one involuntary stop RunPod
records a cause for; RunPod's other stops (an unpullable image, insufficient balance) say
"Exited by Runpod: <date>" and are not preemptions (PROVIDERS.md, late-2026 corrections).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

from simulators.runpod.catalog import CLOUD_TYPES, Catalog, GpuType
from simulators.runtime import Runtime

NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
NO_CAPACITY_SPOT = (
    "There are no longer any instances available with the requested specifications. "
    "Please try again later."
)
VOLUME_USD_PER_GB_MONTH = 0.05
HOURS_PER_MONTH = 730.0
SECRET_ENV_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "B64")
IDLE_COMMAND = "exec sleep 2147483647"  # an image's default CMD when no dockerArgs are given


class SimError(Exception):
    """An error the GraphQL layer returns in RunPod's shape (HTTP 200, errors[0].message)."""


def _rid(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def whole_now() -> float:
    """The simulator's clock to the second, as RunPod's dates state it."""
    return float(int(time.time()))


def iso_time(t: float) -> str:
    """`lastStartedAt` as RunPod's REST answers show it: ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def status_time(t: float | None = None) -> str:
    """RunPod's lastStatusChange date: JavaScript's Date.toString() in UTC."""
    return time.strftime(
        "%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)", time.gmtime(t or time.time())
    )


@dataclass
class Volume:
    id: str
    name: str
    size: int
    data_center: str

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "dataCenterId": self.data_center}


@dataclass
class Pod:
    id: str
    name: str
    gpu: GpuType
    gpu_count: int
    cloud: str  # SECURE or COMMUNITY
    data_center: str
    interruptible: bool
    price_per_gpu: float  # on-demand price, or the bid
    image: str
    docker_args: str
    env: list[tuple[str, str]]
    volume_mount_path: str
    container_disk_gb: int
    volume_gb: int
    network_volume: str | None
    machine_id: str = field(default_factory=lambda: _rid(12))
    desired: str = "RUNNING"
    last_status_change: str = ""
    started_at: float | None = None  # when the current container process started
    restarts: int = 0
    preempting: bool = False
    generation: int = 0  # bumped on every stop/resume so stale supervisors give up
    holds_capacity: bool = False
    last_started_at: float = 0.0  # billing began (rent or resume), whole seconds
    stopped_at: float | None = None  # billing stopped, whole seconds; None while it runs

    @property
    def cost_per_hr(self) -> float:
        return round(self.price_per_gpu * self.gpu_count, 6)

    @property
    def volume_key(self) -> str:
        return self.network_volume or f"pod-{self.id}"


class World:
    """Every pod and volume of the (single) simulated account."""

    def __init__(
        self, catalog: Catalog, runtime: Runtime, start_delay: float, notice_seconds: float
    ) -> None:
        self.catalog = catalog
        self.runtime = runtime
        self.start_delay = start_delay
        self.notice_seconds = notice_seconds
        self.pods: dict[str, Pod] = {}
        self.gone: dict[str, Pod] = {}  # terminated pods (RunPod forgets them; the admin API not)
        self.volumes: dict[str, Volume] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _pod(self, pod_id: str) -> Pod:
        pod = self.pods.get(pod_id)
        if pod is None:
            raise SimError(f"Pod {pod_id} not found.")
        return pod

    def _hold(self, pod: Pod, when: float) -> None:
        """Take the pod's GPUs and start billing it at `when` (whole seconds)."""
        if not pod.holds_capacity:
            self.catalog.take(pod.data_center, pod.gpu.id, pod.cloud, pod.gpu_count)
            pod.holds_capacity = True
        ledger = self.runtime.ledger
        ledger.start(pod.id, "pod", pod.cost_per_hr, owner=pod.name)
        ledger.entries[pod.id].started = when
        pod.last_started_at, pod.stopped_at = when, None

    def _release(self, pod: Pod, when: float) -> None:
        """Give the GPUs back and stop billing at `when`, the date its lastStatusChange states."""
        if pod.holds_capacity:
            self.catalog.give_back(pod.data_center, pod.gpu.id, pod.cloud, pod.gpu_count)
            pod.holds_capacity = False
        entry = self.runtime.ledger.entries.get(pod.id)
        if entry is not None and entry.stopped is None:
            entry.stopped = max(entry.started, when)
            pod.stopped_at = entry.stopped
        pod.started_at = None

    # ------------------------------------------------------------------ pods: changes

    def deploy(self, inp: dict[str, Any], interruptible: bool) -> Pod:
        no_capacity = NO_CAPACITY_SPOT if interruptible else NO_CAPACITY
        gpu = self.catalog.gpu_types.get(inp.get("gpuTypeId") or "")
        if gpu is None:
            raise SimError(f"GPU type {inp.get('gpuTypeId')!r} does not exist.")
        count = int(inp.get("gpuCount") or 1)
        if not 1 <= count <= gpu.max_gpu_count:
            raise SimError(f"gpuCount must be between 1 and {gpu.max_gpu_count}.")
        cloud_type = inp.get("cloudType") or "ALL"
        clouds = list(CLOUD_TYPES) if cloud_type == "ALL" else [cloud_type]
        dc_id = inp.get("dataCenterId")
        if dc_id and dc_id not in self.catalog.data_centers:
            raise SimError(f"Data center {dc_id} does not exist.")
        dcs = [dc_id] if dc_id else list(self.catalog.data_centers)
        volume_id = inp.get("networkVolumeId")
        if volume_id:
            vol = self.volumes.get(volume_id)
            if vol is None:
                raise SimError(f"Network volume {volume_id} not found.")
            if cloud_type == "COMMUNITY":
                raise SimError("Network volumes are only supported on Secure Cloud.")
            if dc_id and dc_id != vol.data_center:
                raise SimError(
                    f"Network volume {volume_id} is in data center {vol.data_center}; a pod that "
                    f"uses it must be deployed in {vol.data_center}, not {dc_id}."
                )
            clouds, dcs = ["SECURE"], [vol.data_center]
        bid = inp.get("bidPerGpu")
        choices: list[tuple[float, str, str]] = []
        for cloud in clouds:
            price = gpu.price(cloud, spot=interruptible)
            if price is None:
                continue
            if interruptible and bid is not None and float(bid) < price:
                continue
            for dc in dcs:
                if self.catalog.free(dc, gpu.id, cloud) >= count:
                    choices.append((price, cloud, dc))
        if not choices:
            if interruptible and bid is not None and any(
                (gpu.price(c, True) or 0) > float(bid) for c in clouds
            ):
                raise SimError(f"Your bid of {float(bid):.3f} per GPU is below the minimum bid price.")
            raise SimError(no_capacity)
        price, cloud, dc = min(choices)
        pod = Pod(
            id=_rid(14),
            name=inp.get("name") or "",
            gpu=gpu,
            gpu_count=count,
            cloud=cloud,
            data_center=dc,
            interruptible=interruptible,
            price_per_gpu=float(bid) if interruptible and bid is not None else price,
            image=inp.get("imageName") or "",
            docker_args=inp.get("dockerArgs") or "",
            env=[(e["key"], e.get("value") or "") for e in (inp.get("env") or [])],
            volume_mount_path=inp.get("volumeMountPath") or "/workspace",
            container_disk_gb=int(inp.get("containerDiskInGb") or 10),
            volume_gb=int(inp.get("volumeInGb") or 0),
            network_volume=volume_id or None,
        )
        now = whole_now()
        pod.last_status_change = f"Rented by User: {status_time(now)}"
        self.pods[pod.id] = pod
        self._hold(pod, now)
        self._spawn(self._supervise(pod, pod.generation))
        return pod

    async def _supervise(self, pod: Pod, generation: int) -> None:
        """Start the pod's container after the start delay; restart it whenever it exits."""
        def live() -> bool:
            return (
                pod.generation == generation and pod.desired == "RUNNING"
                and not pod.preempting and pod.id in self.pods
            )

        await asyncio.sleep(self.start_delay)
        while live():
            env = dict(pod.env)
            machine = await self.runtime.start(
                pod.id, pod.docker_args.strip() or IDLE_COMMAND, env, volume_id=pod.volume_key
            )
            pod.started_at = time.time()
            await machine.proc.wait()
            await asyncio.sleep(0)  # let the runtime record the exit code
            if not live():
                break
            pod.restarts += 1
            pod.started_at = None
            await asyncio.sleep(max(0.1, self.start_delay))

    def stop(self, pod_id: str) -> Pod:
        pod = self._pod(pod_id)
        if pod.desired == "RUNNING":
            now = whole_now()
            pod.generation += 1
            pod.desired = "EXITED"
            pod.last_status_change = f"Exited by user: {status_time(now)}"
            self._release(pod, now)
            self._spawn(self.runtime.kill(pod.id, grace=min(self.notice_seconds, 2.0)))
        return pod

    def resume(self, pod_id: str, gpu_count: int | None, bid: float | None = None) -> Pod:
        pod = self._pod(pod_id)
        if pod.desired == "RUNNING":
            return pod
        if pod.preempting:
            raise SimError("This pod is being stopped; try again in a few seconds.")
        count = int(gpu_count or pod.gpu_count)
        if self.catalog.free(pod.data_center, pod.gpu.id, pod.cloud) < count:
            raise SimError("There are not enough free GPUs on the host machine to start this pod.")
        if bid is not None:
            minimum = pod.gpu.price(pod.cloud, True)
            if minimum is None:
                raise SimError(NO_CAPACITY_SPOT)
            if bid < minimum:
                raise SimError(f"Your bid of {bid:.3f} per GPU is below the minimum bid price.")
            pod.interruptible, pod.price_per_gpu = True, bid
        pod.gpu_count = count
        pod.generation += 1
        pod.desired = "RUNNING"
        now = whole_now()
        pod.last_status_change = f"Resumed by user: {status_time(now)}"
        self._hold(pod, now)
        self._spawn(self._supervise(pod, pod.generation))
        return pod

    def terminate(self, pod_id: str) -> None:
        pod = self._pod(pod_id)
        now = whole_now()
        pod.generation += 1
        pod.desired = "TERMINATED"
        if pod.stopped_at is None:  # an exited pod keeps the date it stopped billing
            pod.last_status_change = f"Terminated by user: {status_time(now)}"
        self._release(pod, now)
        self.gone[pod.id] = self.pods.pop(pod.id)
        self._spawn(self.runtime.kill(pod.id))

    async def preempt(self, pod_id: str, notice_seconds: float | None = None, cause: str = "Outbid") -> Pod:
        """RunPod takes the machine back: SIGTERM, the notice period, SIGKILL; EXITED with
        lastStatusChange "<cause>: <date>" ("Outbid", the reclaim RunPod records, or "Exited by
        Runpod" for its other stops: an unpullable image, insufficient balance)."""
        pod = self._pod(pod_id)
        if pod.desired != "RUNNING" or pod.preempting:
            raise SimError(f"Pod {pod_id} is not running.")
        notice = self.notice_seconds if notice_seconds is None else float(notice_seconds)
        pod.preempting = True
        try:
            await self.runtime.preempt(pod.id, notice)
        finally:
            pod.preempting = False
            pod.generation += 1
            if pod.desired == "RUNNING":
                now = whole_now()
                pod.desired = "EXITED"
                pod.last_status_change = f"{cause}: {status_time(now)}"
                self._release(pod, now)
        return pod

    # ------------------------------------------------------------------ volumes

    def create_volume(self, name: str, size: int, dc: str) -> Volume:
        if dc not in self.catalog.data_centers:
            raise SimError(f"Data center {dc} does not exist.")
        if not 1 <= int(size) <= 4000:
            raise SimError("Network volume size must be between 1 and 4000 GB.")
        vol = Volume(_rid(10), name, int(size), dc)
        self.volumes[vol.id] = vol
        self.runtime.volume_dir(vol.id)
        price = vol.size * VOLUME_USD_PER_GB_MONTH / HOURS_PER_MONTH
        self.runtime.ledger.start(vol.id, "volume", price, owner=name)
        return vol

    def delete_volume(self, volume_id: str) -> None:
        if volume_id not in self.volumes:
            raise SimError(f"Network volume {volume_id} not found.")
        if any(p.network_volume == volume_id for p in self.pods.values()):
            raise SimError("This network volume is attached to a pod. Terminate the pod first.")
        del self.volumes[volume_id]
        self.runtime.ledger.stop(volume_id)

    async def shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.runtime.shutdown()
