"""Offers as columns, so that one placement filters and ranks a whole catalogue (100,000 offers
from several providers) with a few numpy operations instead of a Python loop per offer.

Built once per offer refresh (the engine keeps one while the offers it was built from are the
current ones) and read by every placement until the next refresh. Strings (provider, region,
GPU model) become small integer codes; "unknown" numbers stay 0 (or -1 for the CUDA version),
as the filters expect. Pure: no I/O; immutable once built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from orchestrator.gpus import canonical_gpu
from orchestrator.models import CapacityType, Offer


def offer_vram(offer: Offer) -> int:
    """VRAM per GPU: the offer's own figure, else the GPU model's."""
    if offer.vram_gb > 0 or offer.gpu is None:
        return offer.vram_gb
    gpu = canonical_gpu(offer.gpu)
    return gpu.vram_gb if gpu else 0


def cuda_code(version: str | None) -> int:
    """'12.4' -> 12004, comparable as an integer; None (unknown) -> -1."""
    if version is None:
        return -1
    major, _, minor = version.partition(".")
    return int(major) * 1000 + int(minor or 0)


class OfferIndex:
    """See the module docstring. `offers[i]` is the offer in row i of every column."""

    def __init__(self, offers: Sequence[Offer]) -> None:
        self.offers: tuple[Offer, ...] = tuple(offers)
        offers = self.offers
        n = len(offers)

        def codes(values: list[str | None]) -> tuple[np.ndarray, list[str]]:
            table: dict[str | None, int] = {}
            out = np.fromiter((table.setdefault(v, len(table)) if v is not None else -1 for v in values),
                              dtype=np.int64, count=len(values))
            return out, [name for name in table if name is not None]

        def column(get: Callable[[Offer], object], dtype: type) -> np.ndarray:
            return np.fromiter((get(o) for o in offers), dtype=dtype, count=n)

        self.provider, providers = codes([o.provider for o in offers])
        self.region, regions = codes([o.region for o in offers])
        self.gpu, gpus = codes([o.gpu for o in offers])  # -1 = no GPU
        self.gpu_count = column(lambda o: o.gpu_count, np.int64)
        self.vram = column(offer_vram, np.int64)
        self.vcpu = column(lambda o: o.vcpu, np.int64)
        self.memory = column(lambda o: o.memory_gb, np.int64)
        self.disk = column(lambda o: o.disk_gb, np.int64)
        self.spot = column(lambda o: o.capacity is CapacityType.SPOT, np.bool_)
        self.price = column(lambda o: o.price_per_hour, np.float64)
        self.has_capacity = column(lambda o: o.available > 0, np.bool_)
        self.volumes = column(lambda o: o.supports_volumes, np.bool_)
        self.cuda = column(lambda o: cuda_code(o.max_cuda), np.int64)
        for array in (self.provider, self.region, self.gpu, self.gpu_count, self.vram, self.vcpu, self.memory,
                      self.disk, self.spot, self.price, self.has_capacity, self.volumes, self.cuda):
            array.flags.writeable = False
        self.provider_names: list[str] = list(providers)
        self.region_names: list[str] = list(regions)
        self.gpu_names: list[str] = list(gpus)
        self.positions: dict[str, list[int]] = {}  # "provider:offer_id" -> rows
        for i, o in enumerate(self.offers):
            self.positions.setdefault(f"{o.provider}:{o.offer_id}", []).append(i)

    @classmethod
    def build(cls, offers: Sequence[Offer]) -> OfferIndex:
        return cls(offers)

    def __len__(self) -> int:
        return len(self.offers)

    def rows_where(self, column: np.ndarray, names: list[str], allowed: Callable[[str], bool]) -> np.ndarray:
        """Boolean per row: does `allowed` accept the name behind the row's code in `column`?
        (`allowed` is asked once per distinct name, not once per row.) Rows coded -1 (no GPU)
        are not accepted."""
        table = np.array([allowed(name) for name in names] + [False], dtype=bool)  # [-1] -> False
        return table[column]
