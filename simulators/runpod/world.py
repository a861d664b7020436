"""What the RunPod simulator knows: pods, network volumes and capacity, and how they change.

The GraphQL resolvers, the REST v2 handlers and the admin API all act through `World`, so a pod
behaves the same whichever door a request came in by (one world: a pod made over GraphQL is
listed over REST). Both doors turn their request into one `DeployRequest`. A pod's container is a local process run by the shared
`Runtime`: it starts `start_delay` seconds after the pod is rented (`runtime` is null until
then), is restarted when its main process exits (as RunPod restarts containers), and holds its
GPUs (capacity) and bills by the second until it is stopped, preempted or terminated.

The one billing rule, which the ledger and every API answer follow: a pod is charged
`costPerHr` per second from the moment it was rented or resumed (`lastStartedAt`) until the
moment it stopped (the date in the `lastStatusChange` that stopped it: "Exited by user: <date>",
"Outbid: <date>", "Exited by Runpod: <date>", "Terminated by user: <date>"). RunPod states those
dates to the second, so both moments are whole seconds of the simulator's clock and the ledger
entry of the pod starts and stops at exactly those seconds; a resumed pod starts a new segment.
A pod the provider takes back (`preempt`) says "Outbid: <date>" when it was interruptible (the
one involuntary stop RunPod records a cause for) and "Machine offline: <date>" when its host went
away (*inferred*: RunPod does not document the words; a Community host leaving is the realistic
interruption since spot is gone). RunPod's other stops are not preemptions and say
"Exited by Runpod: <words>: <date>" (spelled RunPod or Runpod): an image that cannot be pulled,
an image too large for the container disk, "Insufficient balance" (PROVIDERS.md, late-2026
corrections; the words after the colon are *inferred*). Over REST v2 the first two are status
ERROR and the balance stop status EXITED, each with the words in `statusMessage` (*inferred*).

Late-2026 rules the world enforces: no interruptible pods unless `settings.interruptible` is on;
a Community launch pinned to a data center finds nothing ("no longer any instances
available"), Community is chosen by country code; network volumes only on Secure Cloud in their
data center; hosts have NVIDIA drivers of different ages and a pod lands on an old one unless it
asks for `minCudaVersion` (the container sees CUDA_DRIVER_VERSION, standing in for nvidia-smi);
the start command given as JSON `{"cmd": [...], "entrypoint": [...]}` (GraphQL dockerArgs) or as
the `dockerEntrypoint` / `dockerStartCmd` arrays (REST) replaces the image's ENTRYPOINT, while a
plain dockerArgs string is the CMD appended to it, as Docker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shlex
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
INTERRUPTIBLE_GONE = (
    "Interruptible (spot) pods are no longer offered: podRentInterruptable has been removed. "
    "Deploy an on-demand pod."
)  # inferred wording
INSUFFICIENT_BALANCE = "Insufficient balance: add funds to your account to deploy pods."  # inferred
VOLUME_USD_PER_GB_MONTH = 0.07  # under 1 TB (late-2026 correction); 0.05 above
HOURS_PER_MONTH = 730.0
SECRET_ENV_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "B64")
IDLE_COMMAND = "exec sleep 2147483647"  # an image's default CMD when no dockerArgs are given


class SimError(Exception):
    """An error each door returns in RunPod's shape (GraphQL: HTTP 200, errors[0].message; REST:
    problem+json with this text as `detail` and `status`)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Image:
    """What the simulator knows of an image: its ENTRYPOINT and CMD, and whether it can be pulled."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    pull: str = "ok"  # ok, missing (cannot be pulled), too_large (for the container disk)


def default_images() -> dict[str, Image]:
    # vLLM's image runs its server from ENTRYPOINT: a start command that is only a CMD becomes
    # arguments of the server (here: python3 -m vllm..., which fails on a host without vLLM)
    return {"vllm/vllm-openai": Image(entrypoint=["python3", "-m", "vllm.entrypoints.openai.api_server"])}


@dataclass
class Settings:
    """What tests change at run time (POST /_sim/settings, /_sim/images, /_sim/account)."""

    interruptible: bool = False  # spot pods, gone since September 2026: opt in to simulate the past
    balance: float = 1000.0  # USD; at or below 0 RunPod stops every pod and refuses launches
    images: dict[str, Image] = field(default_factory=default_images)

    def image(self, name: str) -> Image:
        repo = name.split("@", 1)[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rsplit(":", 1)[0]
        return self.images.get(name) or self.images.get(repo) or Image()


@dataclass
class DeployRequest:
    """One pod creation, from either door."""

    name: str
    image: str
    gpu_type_ids: list[str]
    gpu_count: int = 1
    cloud: str = "ALL"  # ALL, SECURE, COMMUNITY
    data_centers: list[str] | None = None
    countries: list[str] | None = None
    network_volume: str | None = None
    mount_path: str = "/workspace"
    container_disk_gb: int = 10
    volume_gb: int = 0
    env: list[tuple[str, str]] = field(default_factory=list)
    docker_args: str = ""  # GraphQL: a CMD string, or the JSON start command
    entrypoint: list[str] | None = None  # REST dockerEntrypoint ([] or None: the image's)
    cmd: list[str] | None = None  # REST dockerStartCmd ([] or None: the image's)
    min_cuda: str | None = None
    interruptible: bool = False
    bid: float | None = None


def start_command(docker_args: str) -> tuple[list[str] | None, list[str] | None]:
    """The JSON start command in dockerArgs -> (entrypoint, cmd); (None, None) for a plain string."""
    text = docker_args.strip()
    if not text.startswith("{"):
        return None, None
    try:
        data = json.loads(text)
    except ValueError:
        return None, None
    if not isinstance(data, dict) or not set(data) <= {"cmd", "entrypoint"}:
        return None, None
    ep, cmd = data.get("entrypoint"), data.get("cmd")
    ok = all(v is None or (isinstance(v, list) and all(isinstance(a, str) for a in v)) for v in (ep, cmd))
    return (ep, cmd) if ok else (None, None)


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
    host_cuda: str = "12.8"  # the newest CUDA the host's driver supports
    country: str = ""
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    phase: str = "PROVISIONING"  # REST status while desired RUNNING: PROVISIONING, STARTING, RUNNING
    status_message: str = ""  # RunPod's words on why it stopped (REST statusMessage)
    error: bool = False  # stopped by RunPod for its image: REST status ERROR
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

    @property
    def location(self) -> str:
        """Where RunPod says the pod is: its data center on Secure, its country on Community."""
        return self.data_center if self.cloud == "SECURE" else self.country

    def rest_status(self, up: bool) -> str:
        if self.desired == "RUNNING":
            return "RUNNING" if up else self.phase
        if self.desired == "EXITED":
            return "ERROR" if self.error else "EXITED"
        return self.desired


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
        self.settings = Settings()

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _pod(self, pod_id: str) -> Pod:
        pod = self.pods.get(pod_id)
        if pod is None:
            raise SimError(f"Pod {pod_id} not found.", status=404)
        return pod

    def _hold(self, pod: Pod, when: float) -> None:
        """Take the pod's GPUs and start billing it at `when` (whole seconds)."""
        if not pod.holds_capacity:
            self.catalog.take(pod.data_center, pod.gpu.id, pod.cloud, pod.gpu_count, pod.host_cuda)
            pod.holds_capacity = True
        ledger = self.runtime.ledger
        ledger.start(pod.id, "pod", pod.cost_per_hr, owner=pod.name)
        ledger.entries[pod.id].started = when
        pod.last_started_at, pod.stopped_at = when, None

    def _release(self, pod: Pod, when: float) -> None:
        """Give the GPUs back and stop billing at `when`, the date its lastStatusChange states."""
        if pod.holds_capacity:
            self.catalog.give_back(pod.data_center, pod.gpu.id, pod.cloud, pod.gpu_count, pod.host_cuda)
            pod.holds_capacity = False
        entry = self.runtime.ledger.entries.get(pod.id)
        if entry is not None and entry.stopped is None:
            entry.stopped = max(entry.started, when)
            pod.stopped_at = entry.stopped
        pod.started_at = None

    # ------------------------------------------------------------------ pods: changes

    def deploy(self, req: DeployRequest) -> Pod:
        interruptible = req.interruptible
        no_capacity = NO_CAPACITY_SPOT if interruptible else NO_CAPACITY
        if interruptible and not self.settings.interruptible:
            raise SimError(INTERRUPTIBLE_GONE)
        if self.settings.balance <= 0:
            raise SimError(INSUFFICIENT_BALANCE, status=402)
        gpus = [g for g in (self.catalog.gpu_types.get(i) for i in req.gpu_type_ids) if g is not None]
        if not gpus:
            raise SimError(f"GPU type {(req.gpu_type_ids or [''])[0]!r} does not exist.")
        count = int(req.gpu_count or 1)
        for gpu in gpus:
            if not 1 <= count <= gpu.max_gpu_count:
                raise SimError(f"gpuCount must be between 1 and {gpu.max_gpu_count}.")
        cloud_type = req.cloud or "ALL"
        clouds = list(CLOUD_TYPES) if cloud_type == "ALL" else [cloud_type]
        for dc_id in req.data_centers or []:
            if dc_id not in self.catalog.data_centers:
                raise SimError(f"Data center {dc_id} does not exist.")
        dcs = list(req.data_centers or self.catalog.data_centers)
        if req.countries:
            dcs = [d for d in dcs if self.catalog.data_centers[d].country in req.countries]
        volume_id = req.network_volume
        if volume_id:
            vol = self.volumes.get(volume_id)
            if vol is None:
                raise SimError(f"Network volume {volume_id} not found.", status=404)
            if cloud_type == "COMMUNITY":
                raise SimError("Network volumes are only supported on Secure Cloud.")
            if req.data_centers and vol.data_center not in req.data_centers:
                raise SimError(
                    f"Network volume {volume_id} is in data center {vol.data_center}; a pod that "
                    f"uses it must be deployed in {vol.data_center}, not {', '.join(req.data_centers)}."
                )
            clouds, dcs = ["SECURE"], [vol.data_center]
        elif req.data_centers:
            # Community Cloud has no data centers to pin: a pinned Community launch finds nothing
            if clouds == ["COMMUNITY"]:
                raise SimError(NO_CAPACITY)
            clouds = ["SECURE"]
        bid = req.bid
        choices: list[tuple[float, int, str, str, str, GpuType]] = []
        for rank, gpu in enumerate(gpus):
            for cloud in clouds:
                price = gpu.price(cloud, spot=interruptible)
                if price is None:
                    continue
                if interruptible and bid is not None and float(bid) < price:
                    continue
                for dc in dcs:
                    host = self.catalog.host_for(dc, gpu.id, cloud, count, req.min_cuda)
                    if host is not None:
                        choices.append((price, rank, cloud, dc, host, gpu))
        if not choices:
            if interruptible and bid is not None and any(
                (g.price(c, True) or 0) > float(bid) for g in gpus for c in clouds
            ):
                raise SimError(f"Your bid of {float(bid):.3f} per GPU is below the minimum bid price.")
            raise SimError(no_capacity)
        price, _rank, cloud, dc, host, gpu = min(choices, key=lambda c: (c[0], c[1]))
        entrypoint, cmd = req.entrypoint, req.cmd
        if entrypoint is None and cmd is None:
            entrypoint, cmd = start_command(req.docker_args)
        pod = Pod(
            id=_rid(14),
            name=req.name,
            gpu=gpu,
            gpu_count=count,
            cloud=cloud,
            data_center=dc,
            interruptible=interruptible,
            price_per_gpu=float(bid) if interruptible and bid is not None else price,
            image=req.image,
            docker_args=req.docker_args,
            env=list(req.env),
            volume_mount_path=req.mount_path or "/workspace",
            container_disk_gb=int(req.container_disk_gb or 10),
            volume_gb=int(req.volume_gb or 0),
            network_volume=volume_id or None,
            host_cuda=host,
            country=self.catalog.data_centers[dc].country,
            entrypoint=entrypoint,
            cmd=cmd,
        )
        now = whole_now()
        pod.last_status_change = f"Rented by User: {status_time(now)}"
        self.pods[pod.id] = pod
        self._hold(pod, now)
        self._spawn(self._supervise(pod, pod.generation))
        return pod

    def container_command(self, pod: Pod) -> str | None:
        """The /bin/sh line that runs the pod's container as Docker would: the start command's
        entrypoint (else the image's) followed by its cmd (else the image's); a plain dockerArgs
        string is the CMD after the image's ENTRYPOINT. None when the arguments cannot be parsed."""
        image = self.settings.image(pod.image)
        if pod.entrypoint is not None or pod.cmd is not None:
            argv = (pod.entrypoint or image.entrypoint) + (pod.cmd or image.cmd)
        elif image.entrypoint:
            try:
                argv = image.entrypoint + shlex.split(pod.docker_args)
            except ValueError:
                return None
        else:
            return pod.docker_args.strip() or (shlex.join(image.cmd) if image.cmd else IDLE_COMMAND)
        return "exec " + shlex.join(argv) if argv else IDLE_COMMAND

    def _image_failure(self, pod: Pod) -> str | None:
        pull = self.settings.image(pod.image).pull
        if pull == "missing":
            return f"Unable to pull image {pod.image}: manifest unknown"
        if pull == "too_large":
            return f"Image {pod.image} is too large for the container disk of {pod.container_disk_gb} GB"
        return None

    def exit_by_runpod(self, pod: Pod, words: str, spelling: str = "Runpod", error: bool = False) -> None:
        """RunPod stops the pod for a reason of its own (not a reclaim): EXITED, "Exited by
        Runpod: <words>: <date>", billing stops; over REST ERROR (image) or EXITED (balance)."""
        if pod.desired != "RUNNING":
            return
        now = whole_now()
        pod.generation += 1
        pod.desired = "EXITED"
        pod.error = error
        pod.status_message = f"Exited by {spelling}: {words}"
        pod.last_status_change = f"Exited by {spelling}: {words}: {status_time(now)}"
        self._release(pod, now)
        self._spawn(self.runtime.kill(pod.id, grace=min(self.notice_seconds, 2.0)))

    def set_balance(self, balance: float) -> list[str]:
        """Set the account balance; at or below 0 every running pod is stopped for it."""
        self.settings.balance = float(balance)
        stopped = []
        if self.settings.balance <= 0:
            for pod in list(self.pods.values()):
                if pod.desired == "RUNNING" and not pod.preempting:
                    self.exit_by_runpod(pod, "Insufficient balance", spelling="RunPod")
                    stopped.append(pod.id)
        return stopped

    async def _supervise(self, pod: Pod, generation: int) -> None:
        """Start the pod's container after the start delay; restart it whenever it exits."""
        def live() -> bool:
            return (
                pod.generation == generation and pod.desired == "RUNNING"
                and not pod.preempting and pod.id in self.pods
            )

        await asyncio.sleep(self.start_delay)
        if live():
            failure = self._image_failure(pod)
            if failure is not None:
                self.exit_by_runpod(pod, failure, error=True)
                return
        while live():
            pod.phase = "STARTING"
            env = dict(pod.env)
            env["CUDA_DRIVER_VERSION"] = pod.host_cuda  # what nvidia-smi would say on this host
            command = self.container_command(pod) or "echo 'docker: invalid start command' >&2; exit 127"
            machine = await self.runtime.start(pod.id, command, env, volume_id=pod.volume_key)
            pod.started_at = time.time()
            pod.phase = "RUNNING"
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
            pod.error = False
            pod.status_message = "Exited by user"
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
        if self.settings.balance <= 0:
            raise SimError(INSUFFICIENT_BALANCE, status=402)
        count = int(gpu_count or pod.gpu_count)
        if self.catalog.host_for(pod.data_center, pod.gpu.id, pod.cloud, count, pod.host_cuda) is None:
            raise SimError("There are not enough free GPUs on the host machine to start this pod.")
        if bid is not None:
            if not self.settings.interruptible:
                raise SimError(INTERRUPTIBLE_GONE)
            minimum = pod.gpu.price(pod.cloud, True)
            if minimum is None:
                raise SimError(NO_CAPACITY_SPOT)
            if bid < minimum:
                raise SimError(f"Your bid of {bid:.3f} per GPU is below the minimum bid price.")
            pod.interruptible, pod.price_per_gpu = True, bid
        pod.gpu_count = count
        pod.generation += 1
        pod.desired = "RUNNING"
        pod.phase, pod.error, pod.status_message = "PROVISIONING", False, ""
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

    async def preempt(self, pod_id: str, notice_seconds: float | None = None, cause: str | None = None) -> Pod:
        """RunPod takes the machine back: SIGTERM, the notice period, SIGKILL; EXITED with
        lastStatusChange "<cause>: <date>": "Outbid" for an interruptible pod, "Machine offline"
        for an on-demand one whose host went away (the default), or "Exited by Runpod"."""
        pod = self._pod(pod_id)
        cause = cause or ("Outbid" if pod.interruptible else "Machine offline")
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
                pod.status_message = cause
                pod.last_status_change = f"{cause}: {status_time(now)}"
                self._release(pod, now)
        return pod

    # ------------------------------------------------------------------ volumes

    def create_volume(self, name: str, size: int, dc: str) -> Volume:
        if dc not in self.catalog.data_centers:
            raise SimError(f"Data center {dc} does not exist.")
        if self.settings.balance <= 0:
            raise SimError(INSUFFICIENT_BALANCE, status=402)
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
            raise SimError(f"Network volume {volume_id} not found.", status=404)
        if any(p.network_volume == volume_id for p in self.pods.values()):
            raise SimError("This network volume is attached to a pod. Terminate the pod first.", status=409)
        del self.volumes[volume_id]
        self.runtime.ledger.stop(volume_id)

    async def shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.runtime.shutdown()
