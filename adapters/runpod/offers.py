"""RunPod offers, normalized into gpuhop Offers from either wire: the REST v2 GPU catalogue with
availability (`parse_catalog`), or one GraphQL query with an aliased `lowestPrice` per place
(`offers_query` / `parse_offers`).

RunPod is on-demand since September 2026: Secure Cloud offers are per data center (region = the
data center id; network volumes live there) and Community Cloud offers per country (region = the
country code, supports_volumes=False: Community has no network volumes and cannot be pinned to a
data center). Spot offers come only from GraphQL's `minimumBidPrice`, only when the
`interruptible` setting opts in. An Offer's id carries everything launch needs (GPU type id,
cloud type, data center or country, GPU count, spot or not), so launching never looks prices up
again.
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
DATA_CENTERS_QUERY = "query DataCenters { dataCenters { id name location countryCode } }"


@dataclass(frozen=True)
class OfferKey:
    gpu_type_id: str
    cloud: str  # SECURE or COMMUNITY
    place: str  # the data center on SECURE, the country code on COMMUNITY
    gpu_count: int
    spot: bool

    @property
    def data_center(self) -> str | None:
        return self.place if self.cloud == "SECURE" else None

    @property
    def country(self) -> str | None:
        return self.place if self.cloud == "COMMUNITY" and self.place else None

    def encode(self) -> str:
        kind = "spot" if self.spot else "on-demand"
        return f"{self.cloud}|{kind}|{self.place}|{self.gpu_count}|{self.gpu_type_id}"

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


def offers_query(data_centers: list[str], countries: list[str], clouds: list[str]
                 ) -> tuple[str, dict[str, tuple[str, str]]]:
    """The gpuTypes query with one aliased lowestPrice per Secure data center and per Community
    country (Community is chosen by countryCode, never by dataCenterId)."""
    aliases: dict[str, tuple[str, str]] = {}
    parts = []
    places = [("SECURE", "dataCenterId", dc) for dc in data_centers if "SECURE" in clouds]
    places += [("COMMUNITY", "countryCode", cc) for cc in countries if "COMMUNITY" in clouds]
    for i, (cloud, field, place) in enumerate(places):
        alias = f"{cloud[0].lower()}{i}"
        aliases[alias] = (place, cloud)
        parts.append(
            f'{alias}: lowestPrice(input: {{gpuCount: 1, {field}: "{gql_string(place)}", '
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


def _offer(key: OfferKey, gpu: str, vram: int, vcpu1: int, mem1: int, price: float, available: int,
           settings_disk: int, max_cuda: str | None = None) -> Offer:
    n = key.gpu_count
    return Offer(
        provider=PROVIDER, offer_id=key.encode(), region=key.place, gpu=gpu, gpu_count=n, vram_gb=vram,
        vcpu=vcpu1 * n, memory_gb=mem1 * n, disk_gb=settings_disk,
        capacity=CapacityType.SPOT if key.spot else CapacityType.ON_DEMAND,
        price_per_hour=round(price * n, 6), available=available,
        supports_volumes=key.cloud == "SECURE", max_cuda=max_cuda,
    )


def parse_offers(
    gpu_types: list[dict[str, Any]] | None,
    aliases: dict[str, tuple[str, str]],
    settings: RunPodSettings,
) -> list[Offer]:
    """GraphQL gpuTypes with their aliased lowestPrice -> Offers."""
    offers: list[Offer] = []
    for gt in gpu_types or []:
        if not isinstance(gt, dict) or not isinstance(gt.get("id"), str):
            continue
        gpu = canonical_gpu(gt["id"]) or canonical_gpu(str(gt.get("displayName") or ""))
        if gpu is None:
            continue  # a GPU gpuhop has no name for: placement could not ask for it anyway
        vram = int(gt.get("memoryInGb") or gpu.vram_gb)
        max_count = min(int(gt.get("maxGpuCount") or settings.max_gpu_count), settings.max_gpu_count)
        for alias, (place, cloud) in aliases.items():
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
                    key = OfferKey(gt["id"], cloud, place, n, spot)
                    offers.append(_offer(key, gpu.name, vram, vcpu1, mem1, price, available,
                                         settings.max_container_disk_gb))
    return offers


def parse_catalog(gpu_types: Any, settings: RunPodSettings) -> list[Offer]:
    """REST v2 `GET /v2/catalog/gpus?include=AVAILABILITY&product=POD` -> Offers: one per
    availability row (Secure: per data center; Community: per country) and GPU count. The row's
    maxCudaVersion (the newest host driver free there) becomes Offer.max_cuda."""
    offers: list[Offer] = []
    clouds = {c.upper() for c in settings.cloud_types}
    dcs = set(settings.data_centers) if settings.data_centers is not None else None
    for gt in gpu_types if isinstance(gpu_types, list) else []:
        if not isinstance(gt, dict) or not isinstance(gt.get("id"), str):
            continue
        gpu = canonical_gpu(gt["id"]) or canonical_gpu(str(gt.get("displayName") or ""))
        if gpu is None:
            continue
        vram = int(gt.get("memoryInGb") or gpu.vram_gb)
        max_count = min(int(gt.get("maxGpuCount") or settings.max_gpu_count), settings.max_gpu_count)
        for row in gt.get("availability") or []:
            if not isinstance(row, dict):
                continue
            cloud = str(row.get("cloudType") or "").upper()
            if cloud not in CLOUD_FLAG or cloud not in clouds:
                continue
            place = str((row.get("dataCenterId") if cloud == "SECURE" else row.get("countryCode")) or "")
            if not place or (cloud == "SECURE" and dcs is not None and place not in dcs):
                continue
            price = _num(row.get("pricePerGpu"))
            if price is None:
                price = _num(gt.get("securePrice" if cloud == "SECURE" else "communityPrice"))
            if price is None or price <= 0:
                continue
            free = row.get("maxUnreservedGpuCount")
            counts = [n for n in (row.get("availableGpuCounts") or []) if isinstance(n, int)]
            max_cuda = row.get("maxCudaVersion")
            for n in sorted({n for n in counts if 1 <= n <= max_count}):
                available = max(1, int(free) // n) if isinstance(free, int) else 1
                offers.append(_offer(
                    OfferKey(gt["id"], cloud, place, n, False), gpu.name, vram,
                    int(row.get("vcpuPerGpu") or 8), int(row.get("memoryPerGpuGb") or 32), price,
                    available, settings.max_container_disk_gb,
                    str(max_cuda) if isinstance(max_cuda, str) and max_cuda else None,
                ))
    return offers
