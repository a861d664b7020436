"""The `[providers.runpod]` table: validated once, with safe defaults, before the adapter runs."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

CloudType = Literal["secure", "community"]
Api = Literal["rest", "graphql"]


def _all_clouds() -> list[CloudType]:
    return ["secure", "community"]


class RunPodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr | None = Field(default=None, description="falls back to $RUNPOD_API_KEY")
    api: Api = Field(
        default="rest",
        description="REST v2 ({api_url}/v2/...), RunPod's current API; or the deprecated GraphQL "
        "({api_url}/graphql), until RunPod retires it (announced for early 2027)",
    )
    api_url: str = Field(default="https://api.runpod.io", description="REST v2 and GraphQL both live here")
    cloud_types: list[CloudType] = Field(default_factory=_all_clouds)
    interruptible: bool = Field(
        default=False,
        description="spot pods, which RunPod stopped offering in September 2026: only with "
        'api = "graphql", where RunPod still shows a bid price',
    )
    data_centers: list[str] | None = Field(default=None, description="only these Secure Cloud data centers")
    countries: list[str] | None = Field(
        default=None, description="only these Community Cloud countries (ISO codes, e.g. US)")
    offer_ttl_seconds: float = Field(default=30.0, ge=0, le=3600)
    # RunPod's SDK allows 30 s per request and its create makes two; calls run beside the
    # reconcile tick, and RunPod's API takes 10 s at times: 20 s per request, 45 s per call
    request_timeout_seconds: float = Field(default=20.0, gt=0, le=120)
    retry_attempts: int = Field(default=3, ge=1, le=10)
    retry_base_delay_seconds: float = Field(default=0.5, ge=0, le=10)
    retry_budget_seconds: float = Field(default=45.0, gt=0, le=300, description="all retries of one call")
    create_settle_seconds: float = Field(
        default=120.0, ge=0, le=3600,
        description="after a create got no answer, how long it may still land before a launch of "
        "that name creates again",
    )
    max_gpu_count: int = Field(default=8, ge=1, le=16)
    max_container_disk_gb: int = Field(default=500, ge=1, le=65536)

    @model_validator(mode="after")
    def _key_somewhere(self) -> RunPodSettings:
        """A missing key is a configuration mistake: say so at check-config and start-up, in one
        line naming the key, rather than failing every call later."""
        if not (self.api_key and self.api_key.get_secret_value()) and not os.environ.get("RUNPOD_API_KEY"):
            raise ValueError("no RunPod API key: set api_key in [providers.runpod] or the "
                             "RUNPOD_API_KEY environment variable")
        return self

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
