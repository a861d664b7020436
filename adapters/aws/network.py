"""Where in the network an instance is launched: one subnet per availability zone.

Many accounts have no default VPC (deleted by policy, or never made), and there EC2 refuses a
launch without a subnet (`VPCIdNotSpecified`). A zone's subnet is, in order: the one configured
for it (`subnet_ids`), the one tagged for gpuhop (`subnet_tag`: a tag key, or `key=value`), or
the zone's default subnet when the region has a default VPC (then no subnet is sent and EC2
picks it). A zone with none of these is not offered; a region with none at all is a start-up
error that says what to configure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.aws.client import AwsApi
from adapters.base import PermanentError


@dataclass(frozen=True)
class RegionNetwork:
    """What a region offers for launches: zone -> subnet id to send (None = the default one)."""

    region: str
    default_vpc: bool
    subnets: dict[str, str] = field(default_factory=dict)

    def launchable(self, zone: str) -> bool:
        return zone in self.subnets or self.default_vpc

    def subnet_for(self, zone: str) -> str | None:
        return self.subnets.get(zone)


def tag_filter(subnet_tag: str) -> dict[str, Any]:
    """`key` -> any subnet carrying the tag; `key=value` -> that value."""
    key, sep, value = subnet_tag.partition("=")
    if sep:
        return {"Name": f"tag:{key}", "Values": [value]}
    return {"Name": "tag-key", "Values": [key]}


def choose_subnets(rows: list[dict[str, Any]]) -> dict[str, str]:
    """One subnet per zone from DescribeSubnets rows: the available one with the most free
    addresses (ties: the lowest id, so the choice is stable)."""
    best: dict[str, tuple[int, str]] = {}
    for row in rows:
        if row.get("State", "available") != "available":
            continue
        zone, subnet = str(row.get("AvailabilityZone", "")), str(row.get("SubnetId", ""))
        free = int(row.get("AvailableIpAddressCount") or 0)
        current = best.get(zone)
        if zone and subnet and (current is None or (-free, subnet) < (-current[0], current[1])):
            best[zone] = (free, subnet)
    return {zone: subnet for zone, (_, subnet) in best.items()}


async def resolve(
    api: AwsApi, region: str, configured: dict[str, str], subnet_tag: str | None
) -> RegionNetwork:
    """Read the region's default VPC and tagged subnets; raise PermanentError when no zone of
    the region can be launched in."""
    vpcs = await api.paginate("ec2", region, "describe_vpcs", "Vpcs", Filters=[{"Name": "is-default", "Values": ["true"]}])
    subnets: dict[str, str] = {}
    if subnet_tag:
        rows = await api.paginate("ec2", region, "describe_subnets", "Subnets", Filters=[tag_filter(subnet_tag)])
        subnets.update(choose_subnets(rows))
    subnets.update({zone: sid for zone, sid in configured.items() if zone.startswith(region) and zone != region})
    network = RegionNetwork(region=region, default_vpc=bool(vpcs), subnets=subnets)
    if not network.default_vpc and not network.subnets:
        how = f"no subnet is tagged {subnet_tag!r}" if subnet_tag else "no subnet is configured"
        raise PermanentError(
            f"aws: {region} has no default VPC and {how}: set [providers.aws] subnet_ids "
            '(zone -> subnet id) or subnet_tag (e.g. "gpuhop", a tag key on the subnets to use)',
            provider="aws",
        )
    return network
