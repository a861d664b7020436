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
    """Availability zone -> subnet id (default: the zone's default subnet)."""
    security_group_ids: dict[str, list[str]] = Field(default_factory=dict)
    """Region -> security group ids (default: the VPC's default group)."""
    interruption_queue: str = "gpuhop-interruptions"
    """SQS queue (one per region) that an EventBridge rule fills with spot warnings."""
    interruption_notices: bool = True
    """Act on the 2-minute warning (SQS, and the agent watching instance metadata). False =
    notice a reclaim only when the listing shows it (for comparison, or where the queue is not
    allowed)."""
    instance_types: list[str] | None = None
    """Restrict offers to these instance types (default: every type gpuhop knows)."""
    spot_max_price_factor: float = Field(default=1.5, ge=1.0, le=100.0)
    """Spot MaxPrice = offer price x this, unless the launch gives a bid."""
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
