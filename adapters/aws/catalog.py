"""The GPU instance types gpuhop rents on EC2, as static data: what each carries and what it
costs on demand.

EC2's own APIs give neither cheaply: `DescribeInstanceTypes` lacks prices and the Pricing API is
a slow, paginated, us-east-1-only service. Spot prices are live (`DescribeSpotPriceHistory`);
on-demand prices change rarely, so a shipped table (USD/hour, Linux, early 2025) is good enough
and keeps `offers()` to one call per region. GPU names are AWS's, mapped to canonical ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.gpus import Gpu, gpu_by_name


@dataclass(frozen=True)
class Shape:
    instance_type: str
    aws_gpu: str  # AWS's name for the GPU, as in DescribeInstanceTypes
    gpu_count: int
    vcpu: int
    memory_gib: int
    on_demand: float  # USD/hour in us-east-1
    regional: tuple[tuple[str, float], ...] = ()  # (region, USD/hour) where it differs

    @property
    def gpu(self) -> Gpu:
        return gpu_by_name(self.aws_gpu)

    def on_demand_price(self, region: str) -> float:
        return dict(self.regional).get(region, self.on_demand)


SHAPES: dict[str, Shape] = {
    s.instance_type: s
    for s in (
        Shape("g5.xlarge", "A10G", 1, 4, 16, 1.006),
        Shape("g5.12xlarge", "A10G", 4, 48, 192, 5.672),
        Shape("g6.xlarge", "L4", 1, 4, 16, 0.8048),
        Shape("g6e.xlarge", "L40S", 1, 4, 32, 1.861),
        Shape("p4d.24xlarge", "A100", 8, 96, 1152, 32.7726),
        Shape("p5.48xlarge", "H100", 8, 192, 2048, 98.32),
    )
}

# An EBS root volume can be sized to the job's disk_gb (up to 16 TiB), so disk never limits.
EBS_MAX_GB = 16384
