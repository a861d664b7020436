"""gpuhop's AWS EC2 adapter: GPU instances (spot or on-demand) in availability zones, EBS volumes
that follow a job from attempt to attempt in one zone, and spot warnings over EventBridge + SQS.

Launches are idempotent twice over: by the instance's Name tag (an instance with the attempt's
name that is pending or running is returned instead of a new one) and by EC2's ClientToken (the
request's idempotency key), which also covers a launch whose answer was lost. A job's volume is
attached after launch, because EC2 cannot attach at launch a volume that already exists: the
instance carries the volume id in a tag, and every listing attaches it to running instances that
lack it (the previous attempt's instance may still hold it; then the next listing tries again).

Listings say more than EC2's states: every instance carries its `Bill` (billing.py: EC2's own
times, per second with a 60 s minimum, at the spot price in force), and an instance that ended
without its exit reaching the daemon carries the exit the agent printed to the serial console
(exits.py; GetConsoleOutput, asked once per ended instance, a few at a time). `terminate()`
returns the final bill once EC2 says the instance left `running`.

Launches follow what organisations require and AWS advises: IMDSv2 only (`HttpTokens=required`,
hop limit 1: the job's container uses the host's network), no spot MaxPrice (spot is capped at
the on-demand price), a subnet per zone where the account has no default VPC (network.py), and
offers over the account's GPU vCPU quotas listed as unavailable (quotas.py). A retry whose
parameters differ from the first try's under one ClientToken (EC2: IdempotentParameterMismatch)
returns the instance that token made instead of failing.

Start-up never takes the daemon down: `start()` raises one-line adapter errors only and may be
called again after a failure (the network is read and the plumbing for spot warnings created
idempotently, region by region); until it has succeeded, `poll_interruptions()` raises
RetryLater. `verify()` makes one read-only call (DescribeRegions) for `gpuhop check-config`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, TypeVar

from botocore.exceptions import ClientError
from pydantic import BaseModel

from adapters.aws import billing, interruptions, network, quotas
from adapters.aws import offers as offers_mod
from adapters.aws.catalog import SHAPES
from adapters.aws.client import AwsApi, QuotaExceeded, error_code, one_line
from adapters.aws.exits import ExitLine, parse_exit
from adapters.aws.settings import AwsSettings
from adapters.aws.status import (
    TAG_ATTEMPT,
    TAG_JOB,
    TAG_MANAGED,
    TAG_PRICE,
    TAG_VOLUME,
    attached_volumes,
    fault_of,
    tags_of,
    to_instance,
)
from adapters.aws.userdata import build_user_data
from adapters.aws.volumes import VolumeOps
from adapters.base import (
    Adapter,
    AdapterContext,
    AdapterError,
    AuthError,
    Interruption,
    InterruptionSupport,
    PermanentError,
    RetryLater,
    VolumeSupport,
)
from orchestrator.models import (
    Bill,
    CapacityType,
    Instance,
    InstanceState,
    LaunchRequest,
    Offer,
    ProviderVolume,
)

log = logging.getLogger(__name__)
ROOT_DEVICE = "/dev/sda1"
ZONE_MISMATCH = "InvalidVolume.ZoneMismatch"
ATTACH_LATER = frozenset({"VolumeInUse", "IncorrectState", ZONE_MISMATCH})
INSTANCE_NOT_FOUND = frozenset({"InvalidInstanceID.NotFound"})
TOKEN_MISMATCH = frozenset({"IdempotentParameterMismatch"})
# IMDSv2 only; hop limit 1 is enough because the job's container runs with the host's network
METADATA_OPTIONS = {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1}
NOT_TERMINATED = ["pending", "running", "stopping", "stopped", "shutting-down"]
FINAL_STATES = frozenset({"stopped", "terminated"})
T = TypeVar("T")


@dataclass
class _SpotRows:
    fetched_at: float  # wall clock, when the history was read
    since: float  # it covers prices in force from this time on
    types: frozenset[str]
    rows: list[dict[str, Any]]


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
        self._start_lock = asyncio.Lock()
        self._console = asyncio.Semaphore(settings.console_reads)
        self._notices: dict[str, datetime] = {}
        self._terminated: set[str] = set()
        self._regions_of: dict[str, str] = {}  # instance id -> region, as seen
        self._exits: dict[str, ExitLine | None] = {}  # instance id -> its console's exit line (None: none yet)
        self._exits_final: set[str] = set()  # asked once the instance was stopped or terminated
        self._bills: dict[str, Bill] = {}  # instance id -> final bill
        self._ended_seen: dict[str, float] = {}  # instance id -> when first seen ended without a time
        self._spot_rows: dict[str, _SpotRows] = {}  # region -> spot price history read for bills
        self._spot_reads: dict[str, asyncio.Task[list[dict[str, Any]]]] = {}  # region -> read in flight for listings
        self._networks: dict[str, network.RegionNetwork] = {}  # region -> subnets, default VPC
        self._quotas: dict[quotas.Bucket, float] = {}  # GPU vCPU quotas as last read
        self._quotas_read: float | None = None  # monotonic time of the last reading
        self._quota_full: dict[quotas.Bucket, float] = {}  # bucket -> monotonic time it may have room
        self._said: set[str] = set()  # offer-listing notes logged once

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read each region's network (default VPC, subnets) and GPU quotas, and set up spot
        warnings (queue, rule, target) in every region that lacks them. Raises AuthError,
        RetryLater or PermanentError (a region without a default VPC or configured subnets) with
        a one-line message; call it again after a failure (what was made stays made, only the
        missing regions are tried)."""
        async with self._start_lock:
            await self._ensure_networks()
            if self._quotas_read is None:
                await self._read_quotas()
            if not self.settings.interruption_notices:
                return
            missing = [r for r in self.settings.regions if r not in self._poller.urls]
            results = await asyncio.gather(
                *(
                    interruptions.ensure_plumbing(self.api, r, self.settings.interruption_queue, self.settings.rebalance_notices)
                    for r in missing
                ),
                return_exceptions=True,
            )
            failures: list[tuple[str, BaseException]] = []
            for region, result in zip(missing, results, strict=True):
                if isinstance(result, BaseException):
                    failures.append((region, result))
                else:
                    self._poller.urls[region] = result
            for _, result in failures:
                if not isinstance(result, Exception):
                    raise result  # a cancellation
            if failures:
                region, error = failures[0]
                raise self._start_error(region, error) from None

    async def _ensure_networks(self) -> None:
        """Each configured region's subnets and default VPC, read once (network.py)."""
        missing = [r for r in self.settings.regions if r not in self._networks]
        if not missing:
            return
        results = await asyncio.gather(
            *(network.resolve(self.api, r, self.settings.subnet_ids, self.settings.subnet_tag) for r in missing),
            return_exceptions=True,
        )
        for region, result in zip(missing, results, strict=True):
            if isinstance(result, network.RegionNetwork):
                self._networks[region] = result
        for region, result in zip(missing, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # a cancellation
                raise self._start_error(region, result, "cannot read the network") from None

    async def _read_quotas(self) -> None:
        """The GPU vCPU quotas of every region (unreadable ones stay unknown: not enforced)."""
        readings = await asyncio.gather(*(quotas.read_region(self.api, r) for r in self.settings.regions))
        fresh = {bucket: value for reading in readings for bucket, value in reading.items()}
        self._quotas = fresh
        self._quotas_read = time.monotonic()

    def _start_error(self, region: str, error: BaseException, doing: str = "cannot set up spot warnings") -> AdapterError:
        if isinstance(error, PermanentError) and str(error).startswith("aws: "):
            return error  # already says what to do (no default VPC)
        what = f"aws: {doing} in {region}"
        if isinstance(error, AdapterError):
            text = one_line(self.api.redact(f"{what}: {error}"))
            kind = type(error) if isinstance(error, AuthError | RetryLater | PermanentError) else RetryLater
            return kind(text, provider="aws")
        # a malformed answer or anything else unforeseen: transient as far as the daemon knows
        return RetryLater(f"{what}: {type(error).__name__}", provider="aws", delay=10.0)

    async def close(self) -> None:
        await self._poller.close()
        reads = [t for t in self._spot_reads.values() if not t.done()]
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        self.api.close()

    # ------------------------------------------------------------------ offers

    async def offers(self) -> list[Offer]:
        cached = self._offers
        if cached is not None and time.monotonic() - cached[0] < self.settings.offers_ttl:
            return list(cached[1])
        types = [t for t in (self.settings.instance_types or list(SHAPES)) if t in SHAPES]
        if not types:
            return []
        now = datetime.now(UTC)
        histories = await gather_all(
            self.api.paginate(
                "ec2", region, "describe_spot_price_history", "SpotPriceHistory",
                InstanceTypes=types, ProductDescriptions=["Linux/UNIX"], StartTime=now,
            )
            for region in self.settings.regions
        )
        await self._ensure_networks()
        if self._quotas_read is None or time.monotonic() - self._quotas_read >= self.settings.quota_ttl:
            await self._read_quotas()
        result: list[Offer] = []
        for region, rows in zip(self.settings.regions, histories, strict=True):
            built = offers_mod.build_offers(region, offers_mod.latest_spot_prices(rows), types)
            result.extend(self._within_limits(region, built))
        self._offers = (time.monotonic(), result)
        return list(result)

    def _within_limits(self, region: str, offers: list[Offer]) -> list[Offer]:
        """Offers of zones with no subnet are dropped; offers over a GPU vCPU quota are kept
        with available=0. Each reason is logged once (the offer listing has no room for it)."""
        net = self._networks.get(region)
        out: list[Offer] = []
        now = time.monotonic()
        for offer in offers:
            if net is not None and not net.launchable(offer.region):
                self._say(f"aws: no offers in {offer.region}: {region} has no default VPC and no subnet for that zone (subnet_ids, subnet_tag)")
                continue
            bucket = self._bucket_of(offer)
            quota = self._quotas.get(bucket) if bucket is not None else None
            held = bucket is not None and self._quota_full.get(bucket, 0.0) > now
            if bucket is not None and (held or quotas.over_quota(offer.vcpu, quota)):
                why = "a launch was refused over it just now" if held else f"it is {quota:g} vCPUs"
                self._say(f"aws: {bucket.describe()}: {why}; offers needing more are listed as unavailable (available=0)")
                offer = dataclasses.replace(offer, available=0)
            out.append(offer)
        return out

    def _bucket_of(self, offer: Offer) -> quotas.Bucket | None:
        try:
            instance_type, zone, capacity = offers_mod.parse_offer_id(offer.offer_id)
            region = self.region_of(zone)
        except (ValueError, PermanentError):
            return None
        family = quotas.family_of(instance_type)
        if not family:
            return None
        return quotas.Bucket(region, family, "spot" if capacity is CapacityType.SPOT else "on-demand")

    def _say(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            log.warning("%s", text)

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
        await self._ensure_networks()
        if not self._networks[region].launchable(zone):
            raise PermanentError(f"no subnet for {zone} and {region} has no default VPC (set subnet_ids or subnet_tag)", provider="aws")
        # a retried launch finds what an earlier try made (its answer lost or timed out)
        existing = await self._find_by_name(region, req.name)
        if existing is not None:
            return self._normalize(region, existing)
        try:
            user_data = build_user_data(req, self.settings.volume_device, self.settings.interruption_notices)
        except ValueError as exc:
            raise PermanentError(str(exc), provider="aws") from None
        params = self._run_params(req, instance_type, zone, capacity, user_data)
        # botocore retries a timed-out RunInstances with the same ClientToken: EC2 makes one
        try:
            answer = await self.api.call("ec2", region, "run_instances", expect=TOKEN_MISMATCH, **params)
        except ClientError:
            # this token already made an instance, from other parameters (an earlier try of this
            # attempt, e.g. before a price or tag changed): that instance is this launch's
            return await self._launched_by_token(region, str(params["ClientToken"]))
        except QuotaExceeded:
            bucket = self._bucket_of(req.offer)
            if bucket is not None:
                self._quota_full[bucket] = time.monotonic() + self.settings.quota_hold_seconds
                self._offers = None  # the next listing shows it
            raise
        return self._normalize(region, answer["Instances"][0])

    async def _launched_by_token(self, region: str, token: str) -> Instance:
        found = await self.api.paginate(
            "ec2", region, "describe_instances", "Reservations", Filters=[{"Name": "client-token", "Values": [token]}],
        )
        raws = [i for r in found for i in r.get("Instances", [])]
        if not raws:  # EC2 lists a new instance a little after it made it
            raise RetryLater("aws: EC2 has an instance for this launch's ClientToken that it does not list yet", provider="aws", delay=5.0)
        return self._normalize(region, raws[0])

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
            "MetadataOptions": dict(METADATA_OPTIONS),
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
            # no MaxPrice (AWS advises against one; the bid, if any, is not sent): capped at on-demand
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        net = self._networks.get(region)
        subnet = net.subnet_for(zone) if net is not None else self.settings.subnet_ids.get(zone)
        if subnet:
            params["SubnetId"] = subnet
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
                {"Name": "instance-state-name", "Values": NOT_TERMINATED},
            ],
        )
        raws = [i for r in found for i in r.get("Instances", [])]
        return raws[0] if raws else None

    # ------------------------------------------------------------------ observe

    async def list_instances(self) -> list[Instance]:
        """Every instance of ours in every region, one per instance id (two that carry one name
        are both listed: the engine ends the extra one). Fails as a whole when a region fails:
        a partial listing would look like instances that vanished."""
        batches = await gather_all(self._list_region(r) for r in self.settings.regions)
        found = [i for batch in batches for i in batch]
        live = {i.instance_id for i in found}
        for cache in (self._notices, self._exits, self._bills, self._ended_seen):
            for gone in set(cache) - live:
                cache.pop(gone, None)
        self._exits_final &= live
        return found

    async def _list_region(self, region: str) -> list[Instance]:
        reservations = await self.api.paginate(
            "ec2", region, "describe_instances", "Reservations",
            Filters=[{"Name": f"tag:{TAG_MANAGED}", "Values": [self.ctx.prefix]}],
        )
        raws = [i for r in reservations for i in r.get("Instances", [])]
        raws = [r for r in raws if tags_of(r).get("Name", "").startswith(f"{self.ctx.prefix}-")]
        reasons = await gather_all(self._attach_if_needed(region, raw) for raw in raws)
        out = []
        for raw, reason in zip(raws, reasons, strict=True):
            instance = self._normalize(region, raw)
            if reason:
                instance.reason = reason
            elif _waits_for_volume(raw) and instance.state == InstanceState.RUNNING:
                # the job cannot start before its volume is there (the previous attempt's machine
                # may hold it for EC2's two minutes of notice): not running yet, so the agent's
                # silence is not counted against it (the fault storm saw such an attempt called
                # lost 13 s after "running", then its job start once the volume came)
                instance.state = InstanceState.PENDING
                instance.reason = f"waiting for its volume {tags_of(raw).get(TAG_VOLUME)} to be attached"
            out.append(instance)
        await self._read_exits(region, out)
        bills = await self._bills_for(region, raws, {}, wait=False)
        for raw, instance in zip(raws, out, strict=True):
            instance.bill = bills.get(str(raw["InstanceId"]))
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
        instance = to_instance(raw, notices=self._notices, terminated_by_us=self._terminated)
        line = self._exits.get(instance.instance_id)
        if line is not None:
            _apply_exit(instance, line)
        return instance

    # ------------------------------------------------------------------ exits from the console

    async def _read_exits(self, region: str, instances: list[Instance]) -> None:
        """For ended instances whose exit is not known yet, read the agent's exit line from the
        serial console. Asked once per instance; an answer without the line is asked once more
        when the instance reaches stopped/terminated (EC2 posts the console at termination)."""
        todo: list[tuple[Instance, bool]] = []
        for instance in instances:
            iid = instance.instance_id
            ec2_state = instance.extra.get("ec2_state", "")
            if self._exits.get(iid) is not None or ec2_state not in billing.ENDED_STATES or not instance.name:
                continue
            final = ec2_state in FINAL_STATES
            if iid in self._exits and (not final or iid in self._exits_final):
                continue
            todo.append((instance, final))
        lines = await gather_all(self._console_exit(region, inst, final) for inst, final in todo)
        for (instance, _), line in zip(todo, lines, strict=True):
            if line is not None:
                _apply_exit(instance, line)

    async def _console_exit(self, region: str, instance: Instance, final: bool) -> ExitLine | None:
        iid = instance.instance_id
        async with self._console:
            try:
                answer = await self.api.call(
                    "ec2", region, "get_console_output", InstanceId=iid, expect=INSTANCE_NOT_FOUND,
                )
            except ClientError:
                answer = {}  # gone: nothing more to learn
                final = True
            except AdapterError as exc:
                log.warning("aws: cannot read the console of %s yet: %s", iid, exc)
                return None  # asked again at the next listing
        line = parse_exit(str(answer.get("Output") or ""), instance.name)
        self._exits[iid] = line
        if final:
            self._exits_final.add(iid)
        return line

    # ------------------------------------------------------------------ bills

    async def _bills_for(
        self, region: str, raws: list[dict[str, Any]], ended_fallback: dict[str, float], *, wait: bool = True
    ) -> dict[str, Bill]:
        """Each running or ended instance's bill from EC2's own times; a final one is kept.
        Without `wait` (a listing), spot prices are not waited for: a listing slower than the
        tick is never used, and DescribeSpotPriceHistory can take 10 s (the fault storm's
        latency scenario left every AWS job launching for good). The bills of spot instances
        then use the prices read before, not final, while a fresh read runs in the background,
        or are left out until there is one; a final bill comes from the stop's own answer."""
        now = time.time()
        out: dict[str, Bill] = {}
        spot: list[tuple[str, str, str, float, float | None]] = []  # (id, type, zone, start, end)
        for raw in raws:
            iid = str(raw["InstanceId"])
            if iid in self._bills:
                out[iid] = self._bills[iid]
                continue
            state = str((raw.get("State") or {}).get("Name", ""))
            started = billing.timestamp(raw.get("LaunchTime"))
            if started is None or state == "pending":
                continue  # EC2 bills from running on
            ended = self._ended_at(iid, raw, ended_fallback.get(iid), now) if state in billing.ENDED_STATES else None
            if ended is not None and fault_of(state, str((raw.get("StateReason") or {}).get("Code") or "")):
                out[iid] = self._bill(iid, started, started, now, [(started, 0.0)], final=True)  # never ran
                continue
            instance_type = str(raw.get("InstanceType", ""))
            zone = str((raw.get("Placement") or {}).get("AvailabilityZone", ""))
            if raw.get("InstanceLifecycle") == "spot":
                spot.append((iid, instance_type, zone, started, ended))
                continue
            shape = SHAPES.get(instance_type)
            price = shape.on_demand_price(region) if shape else _tag_price(raw)
            if price is None:
                continue
            out[iid] = self._bill(iid, started, ended, now, [(started, price)], final=ended is not None)
        if spot:
            ends = [end for *_, end in spot if end is not None]
            types, since = frozenset(t for _, t, *_ in spot), min(s for *_, s, _ in spot)
            fresh_after = max(ends) if ends else None
            if wait:
                rows = await self._spot_history(region, types, since, fresh_after)
            else:
                rows = self._spot_history_soon(region, types, since, fresh_after)
            fetched = self._spot_rows[region].fetched_at if region in self._spot_rows else now
            for iid, instance_type, zone, started, ended in spot:
                steps = billing.price_steps(rows, instance_type, zone)
                if steps:
                    final = ended is not None and fetched > ended
                    out[iid] = self._bill(iid, started, ended, now, steps, final=final)
        return out

    def _bill(
        self, iid: str, started: float, ended: float | None, now: float, steps: list[tuple[float, float]], *, final: bool
    ) -> Bill:
        bill = Bill(started_at=started, ended_at=ended, cost_usd=billing.charge(started, ended if ended is not None else now, steps))
        if final:
            self._bills[iid] = bill
        return bill

    def _ended_at(self, iid: str, raw: dict[str, Any], fallback: float | None, now: float) -> float:
        """When billing stopped: EC2's transition time, else the provider's clock when it said
        so (the terminate answer's Date), else when this adapter first saw it ended."""
        when = billing.parse_transition_time(str(raw.get("StateTransitionReason") or ""))
        if when is not None:
            return when
        if fallback is not None:
            return fallback
        return self._ended_seen.setdefault(iid, now)

    def _spot_history_soon(
        self, region: str, types: frozenset[str], since: float, fresh_after: float | None
    ) -> list[dict[str, Any]]:
        """`_spot_history` without waiting: what was read before for these types (possibly
        older than wanted), or nothing, while a read runs in the background if one is due."""
        cached = self._spot_rows.get(region)
        reading = self._spot_reads.get(region)
        if reading is None or reading.done():
            if reading is not None and not reading.cancelled():
                reading.exception()  # retrieved: a failed read is tried again below
            if not self._spot_fresh(cached, types, since, fresh_after, time.time()):
                self._spot_reads[region] = asyncio.create_task(
                    self._spot_history(region, types, since, fresh_after), name=f"aws-spot-prices-{region}")
        return cached.rows if cached is not None and _spot_covers(cached, types, since) else []

    def _spot_fresh(self, cached: _SpotRows | None, types: frozenset[str], since: float, fresh_after: float | None,
                    now: float) -> bool:
        """Whether `cached` answers for these types since `since`: read within offers_ttl, and
        after `fresh_after` (the end of an interval whose bill is made final)."""
        return (_spot_covers(cached, types, since) and cached is not None
                and now - cached.fetched_at < max(self.settings.offers_ttl, 1.0)
                and (fresh_after is None or cached.fetched_at > fresh_after))

    async def _spot_history(
        self, region: str, types: frozenset[str], since: float, fresh_after: float | None
    ) -> list[dict[str, Any]]:
        """Spot prices in force since `since` for `types`, read at most once per offers_ttl
        (and after `fresh_after`, the end of an interval whose bill is made final)."""
        now = time.time()
        cached = self._spot_rows.get(region)
        if self._spot_fresh(cached, types, since, fresh_after, now):
            assert cached is not None
            return cached.rows
        rows = await self.api.paginate(
            "ec2", region, "describe_spot_price_history", "SpotPriceHistory",
            InstanceTypes=sorted(types), ProductDescriptions=["Linux/UNIX"],
            StartTime=datetime.fromtimestamp(since, UTC),
        )
        self._spot_rows[region] = _SpotRows(fetched_at=now, since=since, types=types, rows=rows)
        return rows

    # ------------------------------------------------------------------ terminate

    async def terminate(self, instance_id: str) -> Bill | None:
        """Terminate; returns the final bill once EC2 says the instance left `running` (None
        when it is gone from every region, as an instance is an hour after it ended)."""
        known = self._regions_of.get(instance_id)
        regions = [known] if known else []
        regions += [r for r in self.settings.regions if r != known]
        for region in regions:
            try:
                answer = await self.api.call(
                    "ec2", region, "terminate_instances", InstanceIds=[instance_id], expect=INSTANCE_NOT_FOUND,
                )
            except ClientError:
                continue  # not in this region
            self._terminated.add(instance_id)
            return await self._final_bill(region, instance_id, answer)
        return None  # in no region: already gone, which is success

    async def _final_bill(self, region: str, instance_id: str, answer: dict[str, Any]) -> Bill | None:
        if instance_id in self._bills:
            return self._bills[instance_id]
        try:
            described = await self.api.call(
                "ec2", region, "describe_instances", InstanceIds=[instance_id], expect=INSTANCE_NOT_FOUND,
            )
        except ClientError:
            return None
        raws = [i for r in described.get("Reservations", []) for i in r.get("Instances", [])]
        if not raws:
            return None
        raw = dict(raws[0])
        changes = answer.get("TerminatingInstances", [])
        if any(str((c.get("PreviousState") or {}).get("Name", "")) == "pending" for c in changes):
            # EC2 bills from `running` on: one cancelled before it booted cost nothing
            started = billing.timestamp(raw.get("LaunchTime")) or time.time()
            return self._bill(instance_id, started, started, time.time(), [(started, 0.0)], final=True)
        said = {str((c.get("CurrentState") or {}).get("Name", "")) for c in changes}
        if str((raw.get("State") or {}).get("Name")) not in billing.ENDED_STATES:
            if not said & billing.ENDED_STATES:
                return None
            raw["State"] = {"Name": sorted(said & billing.ENDED_STATES)[0]}  # EC2 answers before it lists
        fallback = _response_time(answer)
        bills = await self._bills_for(region, [raw], {instance_id: fallback} if fallback is not None else {})
        return bills.get(instance_id)

    # ------------------------------------------------------------------ volumes

    async def ensure_volume(self, name: str, size_gb: int, region: str) -> ProviderVolume:
        return await self.volumes.ensure(name, size_gb, region, self.region_of(region))

    async def delete_volume(self, volume_id: str) -> None:
        await self.volumes.delete(volume_id)

    def storage_usd_per_month(self, size_gb: int) -> float:
        """EBS gp3 at its us-east-1 list price, $0.08/GB-month (3,000 IOPS and 125 MB/s included)."""
        return round(size_gb * 0.08, 6)

    # ------------------------------------------------------------------ interruptions

    async def poll_interruptions(self, wait_seconds: float) -> list[Interruption]:
        if not self.settings.interruption_notices:
            await asyncio.sleep(wait_seconds)
            return []
        if len(self._poller.urls) < len(self.settings.regions):
            try:
                await self.start()
            except AdapterError as exc:
                raise RetryLater(f"spot warnings are not set up yet: {exc}", provider="aws", delay=10.0) from None
        notices = await self._poller.poll(wait_seconds)
        out = []
        for notice in notices:
            if notice.action == interruptions.REBALANCE:
                if self.settings.rebalance_notices:  # a hint, not a reclaim: the end stays unjudged
                    out.append(notice)
                continue
            self._notices[notice.instance_id] = notice.deadline
            out.append(notice)
        return out

    # ------------------------------------------------------------------ check-config

    async def verify(self) -> str:
        """DescribeRegions in the first configured region: read-only, allowed by the shipped IAM
        policy, and refused (AuthError) for credentials AWS does not accept. Opens its own
        clients and closes them; needs no start()."""
        api = AwsApi(self.settings)
        region = self.settings.regions[0]
        try:
            answer = await api.call("ec2", region, "describe_regions", AllRegions=False)
        finally:
            api.close()
        enabled = {str(r.get("RegionName")) for r in answer.get("Regions", [])}
        missing = [r for r in self.settings.regions if r not in enabled]
        text = f"credentials ok: EC2 answers in {region}; {len(self.settings.regions) - len(missing)} of {len(self.settings.regions)} configured regions enabled"
        if missing:
            text += f" (not enabled: {', '.join(missing)})"
        return text

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


def _spot_covers(cached: _SpotRows | None, types: frozenset[str], since: float) -> bool:
    """Whether a spot price read holds these instance types from `since` on (fresh or not)."""
    return cached is not None and types <= cached.types and cached.since <= since


async def gather_all(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Every awaitable run to its end (none left running when one fails), then the first
    failure raised, or the results in order."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


def _apply_exit(instance: Instance, line: ExitLine) -> None:
    instance.exit_code = line.exit_code
    instance.exit_signal = line.exit_signal
    instance.extra["exit_sigterm"] = "true" if line.sigterm else "false"
    if instance.state is not InstanceState.PREEMPTED:
        instance.state = InstanceState.EXITED


def _tag_price(raw: dict[str, Any]) -> float | None:
    try:
        return float(tags_of(raw)[TAG_PRICE])
    except (KeyError, ValueError):
        return None


def _response_time(answer: dict[str, Any]) -> float | None:
    """The provider's clock when it answered (the HTTP Date header), as UNIX seconds."""
    date = (answer.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        return parsedate_to_datetime(str(date)).timestamp()
    except (TypeError, ValueError):
        return None


def _waits_for_volume(raw: dict[str, Any]) -> bool:
    """A running instance launched with a volume that is not attached to it yet."""
    volume_id = tags_of(raw).get(TAG_VOLUME)
    return bool(volume_id) and (raw.get("State") or {}).get("Name") == "running" and volume_id not in attached_volumes(raw)
