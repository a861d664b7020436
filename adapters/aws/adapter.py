"""gpuhop's AWS EC2 adapter: GPU instances (spot or on-demand) in availability zones, EBS volumes
that follow a job from attempt to attempt in one zone, and spot warnings over EventBridge + SQS.

Launches are idempotent twice over: by the instance's Name tag (an instance with the attempt's
name that is pending or running is returned instead of a new one) and by EC2's ClientToken (the
request's idempotency key), which also covers a launch whose answer was lost. A job's volume is
attached after launch, because EC2 cannot attach at launch a volume that already exists: the
instance carries the volume id in a tag, and every listing attaches it to running instances that
lack it (the previous attempt's instance may still hold it; then the next listing tries again).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

from botocore.exceptions import ClientError
from pydantic import BaseModel

from adapters.aws import interruptions
from adapters.aws import offers as offers_mod
from adapters.aws.catalog import SHAPES
from adapters.aws.client import AwsApi, error_code
from adapters.aws.settings import AwsSettings
from adapters.aws.status import (
    TAG_ATTEMPT,
    TAG_JOB,
    TAG_MANAGED,
    TAG_PRICE,
    TAG_VOLUME,
    attached_volumes,
    tags_of,
    to_instance,
)
from adapters.aws.userdata import build_user_data
from adapters.aws.volumes import VolumeOps
from adapters.base import (
    Adapter,
    AdapterContext,
    AdapterError,
    Interruption,
    InterruptionSupport,
    PermanentError,
    VolumeSupport,
)
from orchestrator.models import CapacityType, Instance, LaunchRequest, Offer, ProviderVolume

log = logging.getLogger(__name__)
ROOT_DEVICE = "/dev/sda1"
ZONE_MISMATCH = "InvalidVolume.ZoneMismatch"
ATTACH_LATER = frozenset({"VolumeInUse", "IncorrectState", ZONE_MISMATCH})


class AwsAdapter(Adapter, VolumeSupport, InterruptionSupport):
    name: ClassVar[str] = "aws"
    Settings: ClassVar[type[BaseModel]] = AwsSettings
    notice_seconds: ClassVar[float] = 120.0

    def __init__(self, settings: AwsSettings, ctx: AdapterContext) -> None:
        super().__init__(settings, ctx)
        self.settings: AwsSettings = settings
        self.api = AwsApi(settings)
        self.volumes = VolumeOps(self.api, settings, ctx.prefix)
        self._offers: tuple[float, list[Offer]] | None = None
        self._poller = interruptions.Poller(self.api, self.notice_seconds)
        self._notices: dict[str, datetime] = {}
        self._terminated: set[str] = set()
        self._regions_of: dict[str, str] = {}  # instance id -> region, as seen

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        urls = await asyncio.gather(*(
            interruptions.ensure_plumbing(self.api, r, self.settings.interruption_queue)
            for r in self.settings.regions
        ))
        self._poller.urls = dict(zip(self.settings.regions, urls, strict=True))

    async def close(self) -> None:
        await self._poller.close()

    # ------------------------------------------------------------------ offers

    async def offers(self) -> list[Offer]:
        cached = self._offers
        if cached is not None and time.monotonic() - cached[0] < self.settings.offers_ttl:
            return list(cached[1])
        types = [t for t in (self.settings.instance_types or list(SHAPES)) if t in SHAPES]
        if not types:
            return []
        now = datetime.now(UTC)
        histories = await asyncio.gather(*(
            self.api.paginate(
                "ec2", region, "describe_spot_price_history", "SpotPriceHistory",
                InstanceTypes=types, ProductDescriptions=["Linux/UNIX"], StartTime=now,
            )
            for region in self.settings.regions
        ))
        result: list[Offer] = []
        for region, rows in zip(self.settings.regions, histories, strict=True):
            result.extend(offers_mod.build_offers(region, offers_mod.latest_spot_prices(rows), types))
        self._offers = (time.monotonic(), result)
        return list(result)

    # ------------------------------------------------------------------ launch

    async def launch(self, req: LaunchRequest) -> Instance:
        try:
            instance_type, zone, capacity = offers_mod.parse_offer_id(req.offer.offer_id)
        except ValueError:
            raise PermanentError(f"not an AWS offer id: {req.offer.offer_id!r}", provider="aws") from None
        if instance_type not in SHAPES:
            raise PermanentError(f"unknown instance type {instance_type!r}", provider="aws")
        region = self.region_of(zone)
        if req.volume is not None and req.volume.region != zone:
            raise PermanentError(
                f"volume {req.volume.volume_id} is in {req.volume.region}, the offer in {zone}", provider="aws"
            )
        existing = await self._find_by_name(region, req.name)
        if existing is not None:
            return self._normalize(region, existing)
        try:
            user_data = build_user_data(req, self.settings.volume_device, self.settings.interruption_notices)
        except ValueError as exc:
            raise PermanentError(str(exc), provider="aws") from None
        answer = await self.api.call("ec2", region, "run_instances", **self._run_params(req, instance_type, zone, capacity, user_data))
        return self._normalize(region, answer["Instances"][0])

    def _run_params(
        self, req: LaunchRequest, instance_type: str, zone: str, capacity: CapacityType, user_data: bytes
    ) -> dict[str, Any]:
        region = self.region_of(zone)
        tags = [
            {"Key": "Name", "Value": req.name},
            {"Key": TAG_MANAGED, "Value": self.ctx.prefix},
            {"Key": TAG_JOB, "Value": req.job_id},
            {"Key": TAG_ATTEMPT, "Value": str(req.attempt)},
            {"Key": TAG_PRICE, "Value": f"{req.offer.price_per_hour:.6f}"},
        ]
        instance_tags = [*tags, {"Key": TAG_VOLUME, "Value": req.volume.volume_id}] if req.volume else tags
        params: dict[str, Any] = {
            "ImageId": self.settings.ami_for(region),
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token(req.idempotency_key),
            "UserData": user_data,
            "Placement": {"AvailabilityZone": zone},
            "InstanceInitiatedShutdownBehavior": "terminate",
            # the agent reads the spot notice with a plain GET (IMDSv1) from inside the container
            "MetadataOptions": {"HttpTokens": "optional", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2},
            "BlockDeviceMappings": [{
                "DeviceName": ROOT_DEVICE,
                "Ebs": {"VolumeSize": max(req.disk_gb, self.settings.root_volume_min_gb), "VolumeType": "gp3", "DeleteOnTermination": True},
            }],
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": instance_tags},
                {"ResourceType": "volume", "Tags": [*tags, {"Key": "gpuhop:role", "Value": "root"}]},
            ],
        }
        if capacity is CapacityType.SPOT:
            max_price = req.bid_price_per_hour or req.offer.price_per_hour * self.settings.spot_max_price_factor
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "MaxPrice": f"{max_price:.4f}",
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        if zone in self.settings.subnet_ids:
            params["SubnetId"] = self.settings.subnet_ids[zone]
        if self.settings.security_group_ids.get(region):
            params["SecurityGroupIds"] = self.settings.security_group_ids[region]
        if self.settings.key_name:
            params["KeyName"] = self.settings.key_name
        if self.settings.instance_profile:
            params["IamInstanceProfile"] = {"Name": self.settings.instance_profile}
        return params

    async def _find_by_name(self, region: str, name: str) -> dict[str, Any] | None:
        found = await self.api.paginate(
            "ec2", region, "describe_instances", "Reservations",
            Filters=[
                {"Name": "tag:Name", "Values": [name]},
                {"Name": f"tag:{TAG_MANAGED}", "Values": [self.ctx.prefix]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ],
        )
        raws = [i for r in found for i in r.get("Instances", [])]
        return raws[0] if raws else None

    # ------------------------------------------------------------------ observe

    async def list_instances(self) -> list[Instance]:
        batches = await asyncio.gather(*(self._list_region(r) for r in self.settings.regions))
        found = [i for batch in batches for i in batch]
        live = {i.instance_id for i in found}
        for gone in set(self._notices) - live:
            self._notices.pop(gone, None)
        return found

    async def _list_region(self, region: str) -> list[Instance]:
        reservations = await self.api.paginate(
            "ec2", region, "describe_instances", "Reservations",
            Filters=[{"Name": f"tag:{TAG_MANAGED}", "Values": [self.ctx.prefix]}],
        )
        raws = [i for r in reservations for i in r.get("Instances", [])]
        raws = [r for r in raws if tags_of(r).get("Name", "").startswith(f"{self.ctx.prefix}-")]
        reasons = await asyncio.gather(*(self._attach_if_needed(region, raw) for raw in raws))
        out = []
        for raw, reason in zip(raws, reasons, strict=True):
            instance = self._normalize(region, raw)
            if reason:
                instance.reason = reason
            out.append(instance)
        return out

    async def _attach_if_needed(self, region: str, raw: dict[str, Any]) -> str:
        """Attach the instance's volume when it runs without it; '' or why it never can."""
        volume_id = tags_of(raw).get(TAG_VOLUME)
        state = (raw.get("State") or {}).get("Name")
        if not volume_id or state != "running" or volume_id in attached_volumes(raw):
            return ""
        try:
            await self.api.call(
                "ec2", region, "attach_volume", expect=ATTACH_LATER,
                VolumeId=volume_id, InstanceId=raw["InstanceId"], Device=self.settings.volume_device,
            )
        except ClientError as exc:
            if error_code(exc) != ZONE_MISMATCH:
                return ""  # still held by the previous attempt, or the instance not ready: next time
            # placement keeps a job in its volume's zone, so this is a bug: never run it volumeless
            log.error("aws: volume %s is in another zone than %s; terminating it", volume_id, raw["InstanceId"])
            await self.terminate(str(raw["InstanceId"]))
            return f"{ZONE_MISMATCH}: volume {volume_id} is not in the instance's zone"
        except AdapterError as exc:
            log.warning("aws: cannot attach %s to %s yet: %s", volume_id, raw["InstanceId"], exc)
        return ""

    def _normalize(self, region: str, raw: dict[str, Any]) -> Instance:
        self._regions_of[str(raw["InstanceId"])] = region
        return to_instance(raw, notices=self._notices, terminated_by_us=self._terminated)

    # ------------------------------------------------------------------ terminate

    async def terminate(self, instance_id: str) -> None:
        known = self._regions_of.get(instance_id)
        regions = [known] if known else []
        regions += [r for r in self.settings.regions if r != known]
        for region in regions:
            try:
                await self.api.call(
                    "ec2", region, "terminate_instances", InstanceIds=[instance_id],
                    expect=frozenset({"InvalidInstanceID.NotFound"}),
                )
            except ClientError:
                continue  # not in this region
            self._terminated.add(instance_id)
            return
        # in no region: already gone, which is success

    # ------------------------------------------------------------------ volumes

    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        return await self.volumes.ensure(name, size_gb, region, self.region_of(region))

    async def delete_volume(self, volume_id: str) -> None:
        await self.volumes.delete(volume_id)

    # ------------------------------------------------------------------ interruptions

    async def poll_interruptions(self, wait_seconds: float) -> list[Interruption]:
        if not self.settings.interruption_notices:
            await asyncio.sleep(wait_seconds)
            return []
        if not self._poller.urls:
            await self.start()
        notices = await self._poller.poll(wait_seconds)
        for notice in notices:
            self._notices[notice.instance_id] = notice.deadline
        return notices

    # ------------------------------------------------------------------ helpers

    def region_of(self, zone: str) -> str:
        """The configured region an availability zone belongs to."""
        for region in sorted(self.settings.regions, key=len, reverse=True):
            if zone.startswith(region) and zone != region:
                return region
        raise PermanentError(f"zone {zone!r} is not in a configured region ({', '.join(self.settings.regions)})", provider="aws")


def client_token(key: str) -> str:
    """EC2 ClientTokens are at most 64 ASCII characters."""
    if len(key) <= 64 and key.isascii():
        return key
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
