"""The `[providers.aws]` table: which regions to use, how to reach EC2, and how to launch.

Credentials are optional: without them boto3's default chain (environment, shared config,
instance role) is used, which is what a daemon running on EC2 should do.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# The Deep Learning Base AMI (NVIDIA driver, Docker, NVIDIA Container Toolkit), resolved by EC2
# itself at launch from AWS's public SSM parameter, so no AMI id goes stale in a config file.
DEFAULT_AMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


class AwsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    regions: list[str] = Field(default_factory=lambda: ["us-east-1"], min_length=1)
    """Regions to rent in; offers are per availability zone within them."""
    endpoint_url: str | None = None
    """Another EC2/SQS/EventBridge endpoint (the simulator); None = AWS."""
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    ami_id: str = DEFAULT_AMI
    """AMI with docker and the NVIDIA container toolkit; `resolve:ssm:` parameters work."""
    ami_ids: dict[str, str] = Field(default_factory=dict)
    """Per-region AMI overrides."""
    instance_profile: str | None = None
    key_name: str | None = None
    subnet_ids: dict[str, str] = Field(default_factory=dict)
    """Availability zone -> subnet id (default: a subnet tagged `subnet_tag`, else the zone's
    default subnet). Without a default VPC, zones with no subnet are not offered."""
    subnet_tag: str | None = None
    """Use the subnets carrying this tag key (or `key=value`), one per zone: for accounts
    without a default VPC. `subnet_ids` wins for the zones it names."""
    security_group_ids: dict[str, list[str]] = Field(default_factory=dict)
    """Region -> security group ids (default: the VPC's default group)."""
    interruption_queue: str = "gpuhop-interruptions"
    """SQS queue (one per region) that an EventBridge rule fills with spot warnings."""
    interruption_notices: bool = True
    """Act on the 2-minute warning (SQS, and the agent watching instance metadata). False =
    notice a reclaim only when the listing shows it (for comparison, or where the queue is not
    allowed)."""
    rebalance_notices: bool = False
    """Treat EC2's rebalance recommendation (an instance at elevated risk of interruption) as
    an early warning: the replacement is launched and the job handed over to it, as on the
    2-minute warning. Off by default: a recommendation often comes with no interruption after
    it, and acting on it costs a certain hand-over (the job resumes from its checkpoint, two
    machines billed while the replacement boots) for a possible one; a job with a volume must
    be replaced in the same zone, often the pool at risk. Turn it on when replacements boot too
    slowly for the 2 minutes (large images), so the hand-over is done before the reclaim."""
    instance_types: list[str] | None = None
    """Restrict offers to these instance types (default: every type gpuhop knows)."""
    spot_max_price_factor: float = Field(default=1.5, ge=1.0, le=100.0)
    """Accepted for older configurations and ignored: gpuhop sends no spot MaxPrice (AWS
    advises against one: it raises the interruption rate, and a price that moved between two
    tries of one launch made EC2 refuse the retry as IdempotentParameterMismatch). Spot
    instances are capped at the on-demand price, EC2's default."""
    quota_ttl: float = Field(default=900.0, ge=0)
    """Seconds between readings of the GPU vCPU quotas (Service Quotas); offers over a quota
    are listed as unavailable."""
    quota_hold_seconds: float = Field(default=600.0, ge=0)
    """After a launch fails over quota (MaxSpotInstanceCountExceeded, VcpuLimitExceeded), that
    quota's offers are unavailable for this long (the account's other instances count too)."""
    volume_device: str = "/dev/sdf"
    root_volume_min_gb: int = Field(default=100, ge=8, le=16384)
    """The AMI's snapshot sets a floor on the root volume (the Deep Learning AMI needs ~75 GB)."""
    volume_type: str = "gp3"
    offers_ttl: float = Field(default=30.0, ge=0)
    request_timeout: float = Field(default=30.0, gt=0, le=120)
    """botocore's read timeout per attempt (SQS long polls get 25 s more); connect: at most 5 s."""
    retry_attempts: int = Field(default=4, ge=1, le=10)
    """Attempts per call, botocore's standard retry mode (throttling, 5xx, network faults)."""
    retry_max_seconds: float = Field(default=8.0, gt=0, le=60)
    """Accepted for older configurations and ignored: botocore's standard mode caps each
    backoff at 20 s, so a call is bounded by attempts x (connect + read timeout) + backoffs."""
    call_threads: int = Field(default=16, ge=2, le=64)
    """Size of the adapter's own thread pool for boto3 calls (the store never shares it)."""
    console_reads: int = Field(default=4, ge=1, le=32)
    """At most this many GetConsoleOutput calls at once (reading exits of ended instances)."""

    @field_validator("interruption_queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        if not value or len(value) > 70 or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError("interruption_queue: 1-70 letters, digits, '-' or '_'")
        return value

    def ami_for(self, region: str) -> str:
        return self.ami_ids.get(region, self.ami_id)
