"""RunPod offers: one GraphQL query for every GPU type's price and stock per data center and
cloud type (aliases of `lowestPrice`), normalized into gpuhop Offers.

An Offer's id carries everything launch needs (GPU type id, cloud type, data center, GPU count,
spot or not), so launching never has to look prices up again. RunPod spot exists only where
`lowestPrice.minimumBidPrice` is offered; network volumes exist only on Secure Cloud.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.base import PermanentError
from adapters.runpod.client import gql_string
from adapters.runpod.settings import RunPodSettings
from orchestrator.gpus import canonical_gpu
from orchestrator.models import CapacityType, Offer

PROVIDER = "runpod"
CLOUD_FLAG = {"SECURE": "true", "COMMUNITY": "false"}
LOWEST_PRICE_FIELDS = (
    "minimumBidPrice uninterruptablePrice stockStatus maxUnreservedGpuCount availableGpuCounts "
    "minVcpu minMemory"
)
DATA_CENTERS_QUERY = "query DataCenters { dataCenters { id name location } }"


@dataclass(frozen=True)
class OfferKey:
    gpu_type_id: str
    cloud: str  # SECURE or COMMUNITY
    data_center: str
    gpu_count: int
    spot: bool

    def encode(self) -> str:
        kind = "spot" if self.spot else "on-demand"
        return f"{self.cloud}|{kind}|{self.data_center}|{self.gpu_count}|{self.gpu_type_id}"

    @classmethod
    def decode(cls, offer_id: str) -> OfferKey:
        try:
            cloud, kind, dc, count, gpu = offer_id.split("|", 4)
            key = cls(gpu, cloud, dc, int(count), kind == "spot")
        except ValueError:
            raise PermanentError(f"not a RunPod offer id: {offer_id[:100]!r}", provider=PROVIDER) from None
        if cloud not in CLOUD_FLAG or kind not in ("spot", "on-demand") or key.gpu_count < 1:
            raise PermanentError(f"not a RunPod offer id: {offer_id[:100]!r}", provider=PROVIDER)
        return key


def offers_query(data_centers: list[str], clouds: list[str]) -> tuple[str, dict[str, tuple[str, str]]]:
    """The gpuTypes query with one aliased lowestPrice per (data center, cloud type)."""
    aliases: dict[str, tuple[str, str]] = {}
    parts = []
    for i, dc in enumerate(data_centers):
        for cloud in clouds:
            alias = f"{cloud[0].lower()}{i}"
            aliases[alias] = (dc, cloud)
            parts.append(
                f'{alias}: lowestPrice(input: {{gpuCount: 1, dataCenterId: "{gql_string(dc)}", '
                f"secureCloud: {CLOUD_FLAG[cloud]}}}) {{ {LOWEST_PRICE_FIELDS} }}"
            )
    text = (
        "query GpuOffers { gpuTypes { id displayName memoryInGb maxGpuCount "
        + " ".join(parts)
        + " } }"
    )
    return text, aliases


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_offers(
    gpu_types: list[dict[str, Any]] | None,
    aliases: dict[str, tuple[str, str]],
    settings: RunPodSettings,
) -> list[Offer]:
    offers: list[Offer] = []
    for gt in gpu_types or []:
        if not isinstance(gt, dict) or not isinstance(gt.get("id"), str):
            continue
        gpu = canonical_gpu(gt["id"]) or canonical_gpu(str(gt.get("displayName") or ""))
        if gpu is None:
            continue  # a GPU gpuhop has no name for: placement could not ask for it anyway
        vram = int(gt.get("memoryInGb") or gpu.vram_gb)
        max_count = min(int(gt.get("maxGpuCount") or settings.max_gpu_count), settings.max_gpu_count)
        for alias, (dc, cloud) in aliases.items():
            lp = gt.get(alias)
            if not isinstance(lp, dict):
                continue
            on_demand = _num(lp.get("uninterruptablePrice"))
            bid = _num(lp.get("minimumBidPrice")) if settings.interruptible else None
            counts = [n for n in (lp.get("availableGpuCounts") or []) if isinstance(n, int)]
            free = lp.get("maxUnreservedGpuCount")
            vcpu1 = int(lp.get("minVcpu") or 8)
            mem1 = int(lp.get("minMemory") or 32)
            for n in sorted({n for n in counts if 1 <= n <= max_count}):
                available = max(1, int(free) // n) if isinstance(free, int) else 1
                for price, spot in ((on_demand, False), (bid, True)):
                    if price is None or price <= 0:
                        continue
                    key = OfferKey(gt["id"], cloud, dc, n, spot)
                    offers.append(Offer(
                        provider=PROVIDER,
                        offer_id=key.encode(),
                        region=dc,
                        gpu=gpu.name,
                        gpu_count=n,
                        vram_gb=vram,
                        vcpu=vcpu1 * n,
                        memory_gb=mem1 * n,
                        disk_gb=settings.max_container_disk_gb,
                        capacity=CapacityType.SPOT if spot else CapacityType.ON_DEMAND,
                        price_per_hour=round(price * n, 6),
                        available=available,
                        supports_volumes=cloud == "SECURE",
                    ))
    return offers
