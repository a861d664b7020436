"""EC2's GPU vCPU quotas, and the Service Quotas API that reports them (moto serves Service
Quotas only for VPC).

EC2 counts running GPU instances against per-region vCPU quotas, one per instance family and
market: "All G and VT Spot Instance Requests" (L-3819A6DF), "Running On-Demand G and VT
instances" (L-DB2E81BA), "All P Spot Instance Requests" (L-7212CCBC) and "Running On-Demand P
instances" (L-417A185B). A launch over quota fails with `MaxSpotInstanceCountExceeded` (spot) or
`VcpuLimitExceeded` (on-demand), which are not capacity shortages: waiting does not help.

Service Quotas speaks JSON 1.1 (`X-Amz-Target: ServiceQuotasV20190624.<Action>`); this module
answers GetServiceQuota and GetAWSDefaultServiceQuota from the simulator's quota table. An unset
quota has no applied value (GetServiceQuota: NoSuchResourceException), its default is reported
as `UNSET_VALUE`, and it does not limit launches.
"""

from __future__ import annotations

import json
from typing import Any

Reply = tuple[int, dict[str, str], bytes]

CODES: dict[tuple[str, str], tuple[str, str]] = {  # (family, market) -> (quota code, name)
    ("G", "spot"): ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    ("G", "on-demand"): ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    ("P", "spot"): ("L-7212CCBC", "All P Spot Instance Requests"),
    ("P", "on-demand"): ("L-417A185B", "Running On-Demand P instances"),
}
BY_CODE = {code: key for key, (code, _) in CODES.items()}
FAMILIES = ("G", "P")
UNSET_VALUE = 4096.0
_JSON = {"Content-Type": "application/x-amz-json-1.1"}


def family_of(instance_type: str) -> str:
    """'g5.xlarge' -> 'G', 'vt1.3xlarge' -> 'G', 'p5.48xlarge' -> 'P', others -> ''."""
    prefix = instance_type.split(".", 1)[0].lower()
    if prefix.startswith("vt") or prefix.startswith("g"):
        return "G"
    if prefix.startswith("p"):
        return "P"
    return ""


class Quotas:
    """vCPU quotas per (region, market, family); None = not set (unlimited here)."""

    def __init__(self) -> None:
        self.vcpus: dict[tuple[str, str, str], int] = {}

    def set(self, region: str, market: str, family: str | None, vcpus: int | None) -> None:
        for fam in (family,) if family else FAMILIES:
            if vcpus is None:
                self.vcpus.pop((region, market, fam), None)
            else:
                self.vcpus[(region, market, fam)] = int(vcpus)

    def limit(self, region: str, market: str, instance_type: str) -> int | None:
        return self.vcpus.get((region, market, family_of(instance_type)))

    def handle(self, region: str, account: str, target: str, body: bytes) -> Reply:
        action = target.rsplit(".", 1)[-1]
        try:
            data: Any = json.loads(body or b"{}")
        except ValueError:
            return _error("ValidationException", "the request body is not JSON")
        if action not in ("GetServiceQuota", "GetAWSDefaultServiceQuota") or not isinstance(data, dict):
            return _error("UnknownOperationException", f"{action} is not served by the simulator")
        service, code = str(data.get("ServiceCode", "")), str(data.get("QuotaCode", ""))
        key = BY_CODE.get(code)
        if service != "ec2" or key is None:
            return _error("NoSuchResourceException", f"The request failed because the specified service or quota does not exist: {service}/{code}")
        family, market = key
        value = UNSET_VALUE if action == "GetAWSDefaultServiceQuota" else self.vcpus.get((region, market, family))
        if value is None:  # never adjusted: only the default is known (GetAWSDefaultServiceQuota)
            return _error("NoSuchResourceException", f"The request failed because the specified quota does not have an applied value: ec2/{code}")
        quota = {
            "ServiceCode": "ec2", "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
            "QuotaArn": f"arn:aws:servicequotas:{region}:{account}:ec2/{code}", "QuotaCode": code,
            "QuotaName": CODES[key][1], "Value": float(value), "Unit": "None", "Adjustable": True,
            "GlobalQuota": False,
        }
        return 200, dict(_JSON), json.dumps({"Quota": quota}).encode()


def _error(code: str, message: str) -> Reply:
    return 400, dict(_JSON), json.dumps({"__type": code, "message": message}).encode()
