"""EC2's GPU vCPU quotas: which quota an instance type draws from, reading them from Service
Quotas, and deciding which offers they rule out.

A new AWS account has 0 vCPUs of G and P quota in most regions, spot and on-demand apart, so an
offer the market has may still be one this account can never launch. Over quota is not scarcity:
EC2 answers `MaxSpotInstanceCountExceeded` (spot) or `VcpuLimitExceeded` (on-demand), and waiting
for capacity does not help. The adapter reads the four quotas per region at start and now and
then, marks the offers they rule out as unavailable (available=0, with the reason logged), and
after a quota error at launch marks that (region, family, market) full for a while (the quota
counts instances the account runs elsewhere, which this daemon cannot see).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from botocore.exceptions import ClientError

from adapters.aws.client import AwsApi, error_code
from adapters.base import AdapterError, AuthError

log = logging.getLogger(__name__)

# (family, market) -> Service Quotas code for EC2 (service code "ec2"); values are vCPUs
CODES: dict[tuple[str, str], str] = {
    ("G", "spot"): "L-3819A6DF",  # All G and VT Spot Instance Requests
    ("G", "on-demand"): "L-DB2E81BA",  # Running On-Demand G and VT instances
    ("P", "spot"): "L-7212CCBC",  # All P Spot Instance Requests
    ("P", "on-demand"): "L-417A185B",  # Running On-Demand P instances
}
NOT_SET = frozenset({"NoSuchResourceException"})  # no applied value: the default applies


def family_of(instance_type: str) -> str:
    """The quota family: 'g5.xlarge' -> 'G' (G and VT), 'p5.48xlarge' -> 'P', else ''."""
    prefix = instance_type.split(".", 1)[0].lower()
    if prefix.startswith(("g", "vt")):
        return "G"
    if prefix.startswith("p"):
        return "P"
    return ""


@dataclass(frozen=True)
class Bucket:
    """One quota: a region's vCPUs for one family in one market."""

    region: str
    family: str
    market: str  # "spot" or "on-demand"

    def describe(self) -> str:
        names = {"G": "G and VT", "P": "P"}
        return f"{names.get(self.family, self.family)} {self.market} vCPU quota in {self.region} ({CODES.get((self.family, self.market), '?')})"


def over_quota(vcpus: int, quota: float | None) -> bool:
    """An instance of `vcpus` can never start under `quota` vCPUs (None: unknown, allowed)."""
    return quota is not None and vcpus > quota


async def read_region(api: AwsApi, region: str) -> dict[Bucket, float]:
    """The four GPU quotas of `region` (applied value, else AWS's default). A quota that cannot
    be read is left out (unknown: not enforced); AccessDenied ends the reading for the region."""
    out: dict[Bucket, float] = {}
    for (family, market), code in CODES.items():
        try:
            answer = await api.call(
                "service-quotas", region, "get_service_quota", ServiceCode="ec2", QuotaCode=code, expect=NOT_SET,
            )
        except ClientError as exc:
            if error_code(exc) not in NOT_SET:
                raise
            try:
                answer = await api.call("service-quotas", region, "get_aws_default_service_quota", ServiceCode="ec2", QuotaCode=code)
            except AdapterError as err:
                log.warning("aws: cannot read quota %s in %s: %s", code, region, err)
                continue
        except AuthError as exc:  # not allowed to read quotas: none is enforced, said once
            log.warning("aws: cannot read Service Quotas in %s (offers are not checked against quotas): %s", region, exc)
            return out
        except AdapterError as exc:
            log.warning("aws: cannot read quota %s in %s (offers are not checked against it): %s", code, region, exc)
            continue
        value = (answer.get("Quota") or {}).get("Value")
        if isinstance(value, int | float):
            out[Bucket(region, family, market)] = float(value)
    return out
