"""The AWS simulator's market: instance types, prices and capacity, loaded from a TOML catalogue.

moto answers `DescribeSpotPriceHistory` with a constant and never runs out of capacity; this
module is what the simulator consults instead. Spot prices keep a history (every admin change is
a new entry) so the history call can be answered the way EC2 does, and capacity is counted per
(instance type, availability zone, market) so that `RunInstances` can fail like EC2.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalogs" / "aws.toml"
MARKETS = ("spot", "on-demand")


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpu: int
    memory_gib: int
    gpu: str
    gpu_count: int
    gpu_memory_gib: int
    on_demand: dict[str, float]  # region -> USD/hour


@dataclass
class ZoneOffer:
    """One instance type in one zone: its spot price history and free capacity per market."""

    spot_history: list[tuple[float, float]]  # (unix time, USD/hour), oldest first
    capacity: dict[str, int] = field(default_factory=dict)  # market -> instances still startable

    @property
    def spot_price(self) -> float:
        return self.spot_history[-1][1]


class Catalog:
    """Prices and capacity, mutable through the simulator's admin API."""

    def __init__(self, data: dict[str, Any], loaded_at: float | None = None) -> None:
        start = loaded_at if loaded_at is not None else time.time() - 3600
        self.types: dict[str, InstanceType] = {}
        for name, spec in _table(data, "instance_types").items():
            self.types[name] = InstanceType(
                name=name,
                vcpu=int(spec["vcpu"]),
                memory_gib=int(spec["memory_gib"]),
                gpu=str(spec["gpu"]),
                gpu_count=int(spec["gpu_count"]),
                gpu_memory_gib=int(spec["gpu_memory_gib"]),
                on_demand={str(k): float(v) for k, v in dict(spec["on_demand"]).items()},
            )
        self.zones: dict[str, str] = {}  # zone -> region
        self.offers: dict[tuple[str, str], ZoneOffer] = {}
        for zone, spec in _table(data, "zones").items():
            self.zones[zone] = str(spec["region"])
            for type_name, entry in dict(spec.get("types", {})).items():
                if type_name not in self.types:
                    raise ValueError(f"zone {zone}: unknown instance type {type_name!r}")
                self.offers[(type_name, zone)] = ZoneOffer(
                    spot_history=[(start, float(entry["spot"]))],
                    capacity={
                        "spot": int(entry.get("spot_capacity", 0)),
                        "on-demand": int(entry.get("on_demand_capacity", 0)),
                    },
                )
        self.gp3_usd_per_gb_month = float(_table(data, "volumes").get("gp3_usd_per_gb_month", 0.08))

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        with open(path or DEFAULT_CATALOG, "rb") as fh:
            return cls(tomllib.load(fh))

    @property
    def regions(self) -> list[str]:
        return sorted(set(self.zones.values()))

    def offer(self, instance_type: str, zone: str) -> ZoneOffer | None:
        return self.offers.get((instance_type, zone))

    def on_demand_price(self, instance_type: str, region: str) -> float | None:
        spec = self.types.get(instance_type)
        return None if spec is None else spec.on_demand.get(region)

    def price(self, instance_type: str, zone: str, market: str) -> float:
        """What an instance of this type costs per hour now, in this zone and market."""
        offer = self.offer(instance_type, zone)
        if market == "spot" and offer is not None:
            return offer.spot_price
        return self.on_demand_price(instance_type, self.zones.get(zone, "")) or 0.0

    def set_spot_price(self, instance_type: str, zone: str, price: float) -> None:
        offer = self._require(instance_type, zone)
        if price <= 0:
            raise ValueError("spot price must be positive")
        offer.spot_history.append((time.time(), float(price)))

    def set_on_demand_price(self, instance_type: str, region: str, price: float) -> None:
        spec = self.types.get(instance_type)
        if spec is None or price <= 0:
            raise ValueError(f"unknown instance type {instance_type!r} or bad price")
        spec.on_demand[region] = float(price)

    def set_capacity(self, instance_type: str | None, zone: str, market: str | None, count: int) -> int:
        """Total capacity of (type, zone, market); a None type or market means all of them.
        Returns how many were set."""
        if market is not None and market not in MARKETS:
            raise ValueError(f"market must be one of {MARKETS}")
        if instance_type is not None:
            self._require(instance_type, zone)
        n = 0
        for (type_name, z), offer in self.offers.items():
            if z != zone or instance_type not in (None, type_name):
                continue
            for m in (market,) if market else MARKETS:
                offer.capacity[m] = max(0, int(count))
                n += 1
        if n == 0:
            raise ValueError(f"no offers in zone {zone!r}")
        return n

    def spot_history(
        self, types: set[str], zones: set[str], start: float | None, end: float | None
    ) -> list[tuple[str, str, float, float]]:
        """(type, zone, unix time, price) newest first: the price in effect at `start` and every
        change after it, as EC2 answers DescribeSpotPriceHistory."""
        rows: list[tuple[str, str, float, float]] = []
        for (type_name, zone), offer in self.offers.items():
            if (types and type_name not in types) or (zones and zone not in zones):
                continue
            history = offer.spot_history
            for i, (ts, price) in enumerate(history):
                next_ts = history[i + 1][0] if i + 1 < len(history) else float("inf")
                if start is not None and next_ts <= start:
                    continue  # superseded before the window opened
                if end is not None and ts > end:
                    continue
                rows.append((type_name, zone, ts, price))
        rows.sort(key=lambda r: (-r[2], r[0], r[1]))
        return rows

    def as_json(self) -> dict[str, object]:
        return {
            "zones": self.zones,
            "offers": [
                {
                    "instance_type": t,
                    "zone": z,
                    "spot_price": o.spot_price,
                    "on_demand_price": self.on_demand_price(t, self.zones[z]),
                    "capacity": dict(o.capacity),
                }
                for (t, z), o in sorted(self.offers.items())
            ],
        }

    def _require(self, instance_type: str, zone: str) -> ZoneOffer:
        offer = self.offer(instance_type, zone)
        if offer is None:
            raise ValueError(f"{instance_type} is not offered in {zone!r}")
        return offer


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"catalogue: [{key}] must be a table")
    return value
