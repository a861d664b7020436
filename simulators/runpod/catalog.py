"""The RunPod simulator's catalogue: data centers, GPU types with prices, and free capacity.

Kept apart from the server so tests and the demo can load, inspect and change a catalogue
(prices per GPU type and cloud type, free GPUs per data center, GPU type and cloud type) without
running anything. The default lives in `simulators/catalogs/runpod.toml`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalogs" / "runpod.toml"
CLOUD_TYPES = ("SECURE", "COMMUNITY")


@dataclass
class DataCenter:
    id: str
    name: str
    location: str


@dataclass
class GpuType:
    id: str
    display_name: str
    memory_gb: int
    max_gpu_count: int = 8
    vcpu_per_gpu: int = 8
    memory_per_gpu_gb: int = 32
    manufacturer: str = "Nvidia"
    # USD per GPU-hour by kind: "SECURE", "COMMUNITY", "SECURE_SPOT", "COMMUNITY_SPOT"
    prices: dict[str, float] = field(default_factory=dict)

    def price(self, cloud: str, spot: bool = False) -> float | None:
        return self.prices.get(f"{cloud}_SPOT" if spot else cloud)


@dataclass
class Catalog:
    data_centers: dict[str, DataCenter]
    gpu_types: dict[str, GpuType]
    # (data center id, gpu type id, cloud type) -> GPUs there in all (free + rented)
    capacity: dict[tuple[str, str, str], int]
    # the same keys -> GPUs rented now; free = capacity - in use, never below 0, so shrinking
    # the capacity below what is rented (a data center running out) holds after pods end
    in_use: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def free(self, dc: str, gpu: str, cloud: str) -> int:
        key = (dc, gpu, cloud)
        return max(0, self.capacity.get(key, 0) - self.in_use.get(key, 0))

    def take(self, dc: str, gpu: str, cloud: str, count: int) -> None:
        key = (dc, gpu, cloud)
        self.in_use[key] = self.in_use.get(key, 0) + count

    def give_back(self, dc: str, gpu: str, cloud: str, count: int) -> None:
        key = (dc, gpu, cloud)
        self.in_use[key] = max(0, self.in_use.get(key, 0) - count)

    def set_capacity(
        self, count: int, dc: str | None = None, gpu: str | None = None, cloud: str | None = None
    ) -> int:
        """Set the total GPUs of every matching (dc, gpu, cloud); returns how many were set."""
        n = 0
        for d in self.data_centers:
            for g in self.gpu_types:
                for c in CLOUD_TYPES:
                    if (dc in (None, d)) and (gpu in (None, g)) and (cloud in (None, c)):
                        self.capacity[(d, g, c)] = max(0, int(count))
                        n += 1
        return n


_PRICE_KEYS = {
    "secure_price": "SECURE",
    "community_price": "COMMUNITY",
    "secure_spot_price": "SECURE_SPOT",
    "community_spot_price": "COMMUNITY_SPOT",
}


def load_catalog(path: Path | None = None) -> Catalog:
    raw = tomllib.loads(Path(path or DEFAULT_CATALOG).read_text())
    dcs = {
        d["id"]: DataCenter(d["id"], d.get("name", d["id"]), d.get("location", ""))
        for d in raw.get("data_centers", [])
    }
    gpus: dict[str, GpuType] = {}
    for g in raw.get("gpu_types", []):
        prices = {kind: float(g[key]) for key, kind in _PRICE_KEYS.items() if g.get(key) is not None}
        gpus[g["id"]] = GpuType(
            id=g["id"],
            display_name=g.get("display_name", g["id"]),
            memory_gb=int(g.get("memory_gb", 0)),
            max_gpu_count=int(g.get("max_gpu_count", 8)),
            vcpu_per_gpu=int(g.get("vcpu_per_gpu", 8)),
            memory_per_gpu_gb=int(g.get("memory_per_gpu_gb", 32)),
            manufacturer=g.get("manufacturer", "Nvidia"),
            prices=prices,
        )
    capacity: dict[tuple[str, str, str], int] = {}
    for c in raw.get("capacity", []):
        dc, gpu = c["data_center"], c["gpu_type"]
        if dc not in dcs or gpu not in gpus:
            raise ValueError(f"capacity entry names an unknown data center or GPU type: {dc}/{gpu}")
        for cloud in CLOUD_TYPES:
            if c.get(cloud.lower()) is not None:
                capacity[(dc, gpu, cloud)] = int(c[cloud.lower()])
    return Catalog(dcs, gpus, capacity)
