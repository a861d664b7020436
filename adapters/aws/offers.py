"""What EC2 will rent now: one Offer per (instance type, availability zone, market).

The zone is the offer's region because that is where an EBS volume lives. Spot prices come from
`DescribeSpotPriceHistory` (one paginated call per region, latest price per type and zone); the
zones that report a spot price for a type are the zones where it is offered, and the same zones
get an on-demand offer at the shipped on-demand price.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from adapters.aws.catalog import EBS_MAX_GB, SHAPES, Shape
from orchestrator.models import CapacityType, Offer

SEP = "@"


def offer_id(instance_type: str, zone: str, capacity: CapacityType) -> str:
    return f"{instance_type}{SEP}{zone}{SEP}{capacity.value}"


def parse_offer_id(value: str) -> tuple[str, str, CapacityType]:
    instance_type, zone, capacity = value.split(SEP)
    return instance_type, zone, CapacityType(capacity)


def latest_spot_prices(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(instance type, zone) -> the newest spot price among the history rows."""
    newest: dict[tuple[str, str], tuple[datetime, float]] = {}
    for row in rows:
        key = (str(row["InstanceType"]), str(row["AvailabilityZone"]))
        when = row.get("Timestamp") or datetime.min.replace(tzinfo=UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        price = float(row["SpotPrice"])
        if key not in newest or when >= newest[key][0]:
            newest[key] = (when, price)
    return {key: price for key, (_, price) in newest.items()}


def build_offers(region: str, spot: dict[tuple[str, str], float], types: list[str]) -> list[Offer]:
    offers: list[Offer] = []
    for (instance_type, zone), price in sorted(spot.items()):
        shape = SHAPES.get(instance_type)
        if shape is None or instance_type not in types:
            continue
        offers.append(_offer(shape, zone, CapacityType.SPOT, price))
        offers.append(_offer(shape, zone, CapacityType.ON_DEMAND, shape.on_demand_price(region)))
    return offers


def _offer(shape: Shape, zone: str, capacity: CapacityType, price: float) -> Offer:
    gpu = shape.gpu
    return Offer(
        provider="aws",
        offer_id=offer_id(shape.instance_type, zone, capacity),
        region=zone,
        gpu=gpu.name,
        gpu_count=shape.gpu_count,
        vram_gb=gpu.vram_gb,
        vcpu=shape.vcpu,
        memory_gb=shape.memory_gib,
        disk_gb=EBS_MAX_GB,
        capacity=capacity,
        price_per_hour=round(price, 6),
        available=1,
        supports_volumes=True,
    )
