"""The small interface the RunPod adapter uses to reach RunPod, so that the REST v2 API (the
default, rest.py) and the deprecated GraphQL API (graphql.py, `api = "graphql"`, until RunPod
retires it in early 2027) are interchangeable behind it.

A transport turns RunPod's answers into gpuhop's types at its edge (Offer, Instance with its
state, fault and Bill, ProviderVolume) and RunPod's failures into adapters.base's errors; the
adapter keeps the rules that do not depend on the wire (idempotent launch by name, settle window,
volume placement, terminate = stop then delete).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from adapters.runpod.client import RunPodClient
from adapters.runpod.offers import OfferKey
from orchestrator.agent import BOOTSTRAP_ARGV
from orchestrator.models import Instance, Offer, ProviderVolume

# CUDA versions RunPod accepts in allowedCudaVersions (its documented list), newest first
CUDA_VERSIONS = ("13.0", "12.9", "12.8", "12.7", "12.6", "12.5", "12.4", "12.3", "12.2", "12.1", "12.0", "11.8")
# the start command: the agent's bootstrap as ENTRYPOINT + CMD, which replaces the image's own
# ENTRYPOINT (an image such as vLLM's would otherwise get the bootstrap as its arguments)
ENTRYPOINT = list(BOOTSTRAP_ARGV[:2])
START_CMD = list(BOOTSTRAP_ARGV[2:])


@dataclass(frozen=True)
class CreatePod:
    """One pod to create, whatever the wire."""

    name: str
    key: OfferKey  # GPU type, cloud, where (data center on Secure, country on Community), count
    image: str
    env: dict[str, str]
    container_disk_gb: int
    mount_path: str
    volume_id: str | None = None
    min_cuda: str | None = None
    bid_per_gpu: float | None = None  # interruptible (GraphQL only, opt-in)
    entrypoint: list[str] = field(default_factory=lambda: list(ENTRYPOINT))
    cmd: list[str] = field(default_factory=lambda: list(START_CMD))


class Transport(abc.ABC):
    """RunPod's API, one wire format. Every method may raise RetryLater / NoCapacity /
    PermanentError / AuthError; `client.retrying` around them is the caller's business."""

    api: str

    def __init__(self, client: RunPodClient) -> None:
        self.client = client

    @abc.abstractmethod
    async def offers(self, data_centers: list[str] | None, clouds: list[str], interruptible: bool,
                     max_gpu_count: int, max_disk_gb: int) -> list[Offer]:
        """Every on-demand offer (and spot ones when `interruptible` and the wire has them)."""

    @abc.abstractmethod
    async def pods(self, known_regions: dict[str, str]) -> list[Instance]:
        """Every pod of the account (not only ours), normalized; one call."""

    @abc.abstractmethod
    async def create(self, spec: CreatePod) -> Instance:
        """Create the pod; the answer's Instance (PENDING)."""

    @abc.abstractmethod
    async def stop(self, pod_id: str) -> Instance | None:
        """Stop the pod (billing stops); None when RunPod does not know it. Raises
        PermanentError when RunPod refuses to stop it."""

    @abc.abstractmethod
    async def delete(self, pod_id: str) -> None:
        """Terminate (delete) the pod; one RunPod does not know is already gone."""

    @abc.abstractmethod
    async def volumes(self) -> list[ProviderVolume]:
        """Every network volume of the account."""

    @abc.abstractmethod
    async def create_volume(self, name: str, size_gb: int, data_center: str) -> ProviderVolume:
        """Create a network volume in `data_center`."""

    @abc.abstractmethod
    async def delete_volume(self, volume_id: str) -> None:
        """Delete it; raises PermanentError when RunPod refuses (e.g. attached) or does not know it."""

    @abc.abstractmethod
    async def verify(self) -> str:
        """One cheap read (the GPU catalogue) proving the key works: "account ok, N GPU types"."""


def allowed_cuda(min_cuda: str) -> list[str]:
    """RunPod's allowedCudaVersions for 'at least min_cuda' (GraphQL has no minimum field the SDK
    writes): every known version at or above it, or min_cuda itself if it is newer than all."""
    want = tuple(int(p) for p in min_cuda.split("."))
    versions = [v for v in CUDA_VERSIONS if tuple(int(p) for p in v.split(".")) >= want]
    return versions or [min_cuda]
