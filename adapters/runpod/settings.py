"""The `[providers.runpod]` table: validated once, with safe defaults, before the adapter runs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

CloudType = Literal["secure", "community"]


def _all_clouds() -> list[CloudType]:
    return ["secure", "community"]


class RunPodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr | None = Field(default=None, description="falls back to $RUNPOD_API_KEY")
    api_url: str = Field(default="https://api.runpod.io", description="RUNPOD_API_BASE_URL for the SDK")
    cloud_types: list[CloudType] = Field(default_factory=_all_clouds)
    interruptible: bool = Field(default=True, description="offer spot pods where RunPod takes bids")
    data_centers: list[str] | None = Field(default=None, description="only these data centers")
    offer_ttl_seconds: float = Field(default=30.0, ge=0, le=3600)
    request_timeout_seconds: float = Field(default=8.0, gt=0, le=30)
    retry_attempts: int = Field(default=3, ge=1, le=10)
    retry_base_delay_seconds: float = Field(default=0.5, ge=0, le=10)
    retry_budget_seconds: float = Field(default=10.0, gt=0, le=60, description="all retries of one call")
    max_gpu_count: int = Field(default=8, ge=1, le=16)
    max_container_disk_gb: int = Field(default=500, ge=1, le=65536)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("api_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("cloud_types")
    @classmethod
    def _clouds(cls, value: list[CloudType]) -> list[CloudType]:
        if not value:
            raise ValueError("cloud_types must name at least one of secure, community")
        return value
