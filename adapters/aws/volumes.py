"""EBS volumes for jobs: found by name (Name tag) in one availability zone, created when missing,
and deleted idempotently (detached first when an instance still holds one).

A volume lives in one zone, so `ensure` takes the zone; the job's attempts are placed in that
zone and the adapter attaches the volume to each new instance (see adapter.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from botocore.exceptions import ClientError

from adapters.aws.client import AwsApi
from adapters.aws.settings import AwsSettings
from adapters.aws.status import TAG_MANAGED
from adapters.base import RetryLater
from orchestrator.models import ProviderVolume

NOT_FOUND = frozenset({"InvalidVolume.NotFound"})
DETACH_WAIT_SECONDS = 30.0


class VolumeOps:
    def __init__(self, api: AwsApi, settings: AwsSettings, prefix: str) -> None:
        self.api = api
        self.settings = settings
        self.prefix = prefix

    async def ensure(self, name: str, size_gb: int, zone: str, region: str) -> ProviderVolume:
        volumes = await self.api.paginate(
            "ec2", region, "describe_volumes", "Volumes",
            Filters=[
                {"Name": "tag:Name", "Values": [name]},
                {"Name": f"tag:{TAG_MANAGED}", "Values": [self.prefix]},
                {"Name": "tag:gpuhop:role", "Values": ["volume"]},
                {"Name": "availability-zone", "Values": [zone]},
            ],
        )
        live = [v for v in volumes if v.get("State") not in ("deleting", "deleted", "error")]
        if live:
            return self._volume(name, live[0])
        created = await self.api.call(
            "ec2", region, "create_volume",
            AvailabilityZone=zone, Size=size_gb, VolumeType=self.settings.volume_type,
            TagSpecifications=[{
                "ResourceType": "volume",
                "Tags": [
                    {"Key": "Name", "Value": name},
                    {"Key": TAG_MANAGED, "Value": self.prefix},
                    {"Key": "gpuhop:role", "Value": "volume"},
                ],
            }],
        )
        return self._volume(name, created)

    async def delete(self, volume_id: str) -> None:
        for region in self.settings.regions:
            volume = await self._describe(region, volume_id)
            if volume is None:
                continue
            if volume.get("Attachments"):
                await self._detach(region, volume_id)
            try:
                await self.api.call("ec2", region, "delete_volume", VolumeId=volume_id, expect=NOT_FOUND)
            except ClientError:
                pass  # deleted meanwhile: success
            return

    async def _describe(self, region: str, volume_id: str) -> dict[str, Any] | None:
        try:
            answer = await self.api.call("ec2", region, "describe_volumes", VolumeIds=[volume_id], expect=NOT_FOUND)
        except ClientError:
            return None
        volumes = answer.get("Volumes") or []
        return volumes[0] if volumes else None

    async def _detach(self, region: str, volume_id: str) -> None:
        try:
            await self.api.call(
                "ec2", region, "detach_volume", VolumeId=volume_id,
                expect=NOT_FOUND | {"IncorrectState", "InvalidAttachment.NotFound"},
            )
        except ClientError:
            pass  # already detaching or detached
        deadline = time.monotonic() + DETACH_WAIT_SECONDS
        while time.monotonic() < deadline:
            volume = await self._describe(region, volume_id)
            if volume is None or not volume.get("Attachments") or volume.get("State") == "available":
                return
            await asyncio.sleep(1.0)
        raise RetryLater(f"volume {volume_id} is still detaching", provider="aws", delay=10.0)

    def _volume(self, name: str, raw: dict[str, Any]) -> ProviderVolume:
        return ProviderVolume(
            provider="aws", volume_id=str(raw["VolumeId"]), name=name,
            region=str(raw["AvailabilityZone"]), size_gb=int(raw.get("Size") or 0),
        )
