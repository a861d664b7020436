"""The RunPod simulator's catalogue: data centers, GPU types with prices, and free capacity.

Kept apart from the server so tests and the demo can load, inspect and change a catalogue
(prices per GPU type and cloud type, free GPUs per data center, GPU type and cloud type) without
running anything. The default lives in `simulators/catalogs/runpod.toml`.

Each pool (data center, GPU type, cloud type) holds GPUs on two kinds of host: ones whose NVIDIA
driver supports CUDA up to `cuda`, and `old` ones that stop at `old_cuda` (RunPod's fleet has
both; `minCudaVersion` keeps a pod off the old ones). Community pools sit in a data center but
are rented by the data center's country.
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
    country: str = ""


def cuda_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


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
    # the same keys -> how many of the pool's GPUs sit on old-driver hosts (CUDA <= old_cuda)
    old: dict[tuple[str, str, str], int] = field(default_factory=dict)
    old_in_use: dict[tuple[str, str, str], int] = field(default_factory=dict)
    cuda: str = "12.8"
    old_cuda: str = "11.8"

    def _pools(self, key: tuple[str, str, str]) -> tuple[int, int]:
        """(free GPUs on new-driver hosts, free GPUs on old-driver hosts) of one pool."""
        total = self.capacity.get(key, 0)
        old_total = min(self.old.get(key, 0), total)
        old_free = max(0, old_total - self.old_in_use.get(key, 0))
        new_free = max(0, total - old_total - self.in_use.get(key, 0))
        return new_free, old_free

    def free(self, dc: str, gpu: str, cloud: str, min_cuda: str | None = None) -> int:
        new_free, old_free = self._pools((dc, gpu, cloud))
        if min_cuda is None:
            return new_free + old_free
        if cuda_tuple(min_cuda) > cuda_tuple(self.cuda):
            return 0
        return new_free + (old_free if cuda_tuple(min_cuda) <= cuda_tuple(self.old_cuda) else 0)

    def host_for(self, dc: str, gpu: str, cloud: str, count: int, min_cuda: str | None) -> str | None:
        """The driver CUDA of the host a pod of `count` GPUs gets, or None if none fits. Old
        hosts go first (they are what is left free on a real fleet), unless min_cuda rules them out."""
        new_free, old_free = self._pools((dc, gpu, cloud))
        old_ok = min_cuda is None or cuda_tuple(min_cuda) <= cuda_tuple(self.old_cuda)
        new_ok = min_cuda is None or cuda_tuple(min_cuda) <= cuda_tuple(self.cuda)
        if old_ok and old_free >= count:
            return self.old_cuda
        if new_ok and new_free >= count:
            return self.cuda
        return None

    def take(self, dc: str, gpu: str, cloud: str, count: int, host_cuda: str | None = None) -> None:
        key = (dc, gpu, cloud)
        pool = self.old_in_use if host_cuda is not None and host_cuda == self.old_cuda != self.cuda else self.in_use
        pool[key] = pool.get(key, 0) + count

    def give_back(self, dc: str, gpu: str, cloud: str, count: int, host_cuda: str | None = None) -> None:
        key = (dc, gpu, cloud)
        pool = self.old_in_use if host_cuda is not None and host_cuda == self.old_cuda != self.cuda else self.in_use
        pool[key] = max(0, pool.get(key, 0) - count)

    def countries(self) -> list[str]:
        return sorted({d.country for d in self.data_centers.values() if d.country})

    def in_country(self, country: str) -> list[str]:
        return [d.id for d in self.data_centers.values() if d.country == country]

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
        d["id"]: DataCenter(d["id"], d.get("name", d["id"]), d.get("location", ""), d.get("country", ""))
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
    old: dict[tuple[str, str, str], int] = {}
    for c in raw.get("capacity", []):
        dc, gpu = c["data_center"], c["gpu_type"]
        if dc not in dcs or gpu not in gpus:
            raise ValueError(f"capacity entry names an unknown data center or GPU type: {dc}/{gpu}")
        for cloud in CLOUD_TYPES:
            if c.get(cloud.lower()) is not None:
                capacity[(dc, gpu, cloud)] = int(c[cloud.lower()])
            if (c.get("old") or {}).get(cloud.lower()) is not None:
                old[(dc, gpu, cloud)] = int(c["old"][cloud.lower()])
    return Catalog(dcs, gpus, capacity, old=old, cuda=str(raw.get("cuda", "12.8")),
                   old_cuda=str(raw.get("old_cuda", "11.8")))
