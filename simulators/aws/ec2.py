"""The EC2 actions the simulator answers or checks itself before (or instead of) moto.

moto is right about records but knows nothing of markets: it never runs out of capacity,
ignores `MaxPrice`, returns a constant spot price, lets a volume attach across zones or twice,
ignores `ClientToken`, and answers `GetConsoleOutput` with fixed text. Each handler here adds
what EC2 does, with EC2's error codes, and passes everything else through to moto unchanged.
`calls` counts the actions received, for tests that must prove a call was (not) repeated, and
`run_params` keeps every RunInstances request's parameters, for tests of what was sent.

What organisations add on top of EC2 is here too: `require_imdsv2` refuses a RunInstances that
does not set `MetadataOptions.HttpTokens=required`, as a service control policy does
(UnauthorizedOperation); a region without a default VPC refuses a launch without a subnet
(VPCIdNotSpecified); vCPU quotas (quotas.py) refuse launches over them; and `launch_failures`
makes the next matching launches go pending -> terminated with `Server.InsufficientInstanceCapacity`
or `Server.InternalError`, as EC2 does when the capacity it promised is not there at boot.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from moto.ec2.exceptions import InvalidInstanceIdError

from simulators.aws import ec2xml
from simulators.aws.catalog import Catalog
from simulators.aws.faults import Faults, error_message
from simulators.aws.fleet import LAUNCH_FAILURES, USER_SHUTDOWN, Fleet
from simulators.aws.quotas import Quotas
from simulators.aws.userdata import UserDataError, decode_user_data, parse_job

Reply = tuple[int, dict[str, str], bytes]
Forward = Callable[..., Awaitable[Reply]]  # forward() as received, forward(params) with others
XML = {"Content-Type": "text/xml;charset=UTF-8"}


def reply(status: int, body: str) -> Reply:
    return status, dict(XML), body.encode("utf-8")


def error(code: str, message: str) -> Reply:
    return reply(*ec2xml.error_xml(code, message))


class Ec2Front:
    def __init__(self, catalog: Catalog, fleet: Fleet, faults: Faults) -> None:
        self.catalog = catalog
        self.fleet = fleet
        self.faults = faults
        self.quotas = Quotas()
        self.require_imdsv2 = False  # an SCP denying RunInstances without HttpTokens=required
        self.launch_failures: list[dict[str, Any]] = []  # {"code", "count", "instance_type"?, "zone"?}
        self.run_params: list[dict[str, str]] = []
        self._tokens: dict[tuple[str, str], tuple[str, list[str]]] = {}
        self._launch_lock = asyncio.Lock()
        self.calls: Counter[str] = Counter()

    async def handle(
        self, region: str, params: dict[str, str], forward: Forward,
        describe: Callable[[str, list[str]], Awaitable[Reply]], caller: str = "",
    ) -> Reply:
        action = params.get("Action", "")
        self.calls[action] += 1
        fault = self.faults.take(action)
        if fault is not None:
            await asyncio.sleep(fault.delay if fault.code in ("timeout", "latency") else 0)
            if fault.code == "timeout":
                return error("InternalError", "An internal error has occurred")
            if fault.code != "latency":
                return error(fault.code, error_message(fault, caller))
        if action == "GetConsoleOutput":
            answer = self.console_output(params)
            if answer is not None:
                return answer
        if action == "RunInstances":
            return await self.run_instances(region, params, forward, describe)
        if action == "DescribeInstances" and "client-token" in filters(params):
            # moto lacks this filter: the instances a ClientToken made, in any state
            ids = [i for t in filters(params)["client-token"] for i in self._tokens.get((region, t), ("", []))[1]]
            return await describe(region, ids) if ids else reply(200, ec2xml.empty_describe_xml())
        if action == "DescribeSpotPriceHistory":
            return self.spot_price_history(region, params)
        if action == "AttachVolume":
            return await self.attach_volume(region, params, forward)
        if action == "TerminateInstances":
            return await self.terminate_instances(params, forward)
        if action == "DetachVolume" and not params.get("InstanceId"):
            # EC2 takes the volume alone (moto fails without the instance): name its attachment
            volume = self.fleet.backend(region).volumes.get(params.get("VolumeId", ""))
            attachment = getattr(volume, "attachment", None)
            if attachment is not None:
                return await forward({**params, "InstanceId": attachment.instance.id})
        result = await forward()
        if result[0] == 200 and action == "CreateVolume":
            volume_id = ec2xml.xml_values(result[2], "volumeId")[0]
            size = int(params.get("Size") or 8)
            price = size * self.catalog.gp3_usd_per_gb_month / 730.0
            self.fleet.runtime.ledger.start(volume_id, "volume", price, owner=tag(params, "Name"))
        elif result[0] == 200 and action == "DeleteVolume":
            self.fleet.runtime.ledger.stop(params.get("VolumeId", ""))
        return result

    # ------------------------------------------------------------------ RunInstances

    async def run_instances(
        self, region: str, params: dict[str, str], forward: Forward,
        describe: Callable[[str, list[str]], Awaitable[Reply]],
    ) -> Reply:
        self.run_params.append(dict(params))
        del self.run_params[:-200]  # the latest requests, for tests
        token = params.get("ClientToken", "")
        fingerprint = hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()
        async with self._launch_lock:
            seen = self._tokens.get((region, token)) if token else None
            if seen is not None:
                if seen[0] != fingerprint:
                    return error("IdempotentParameterMismatch", "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).")
                status, _, body = await describe(region, seen[1])
                answer = ec2xml.run_instances_from_describe(body) if status == 200 else None
                if answer is not None:
                    return reply(200, answer)
            refusal, job, placement = self._check_launch(region, params)
            if refusal is not None:
                return refusal
            instance_type, zone, market, price = placement
            status, headers, body = await forward()
            if status != 200:
                return status, headers, body
            ids = ec2xml.xml_values(body, "instanceId")
            failure = self._take_launch_failure(instance_type, zone)
            for instance_id in ids:
                self.fleet.register(
                    instance_id, region, zone, instance_type, market, price, job,
                    name=tag(params, "Name", "instance"),
                    http_tokens=params.get("MetadataOptions.HttpTokens") or "optional",
                    hop_limit=int(params.get("MetadataOptions.HttpPutResponseHopLimit") or 1),
                    launch_failure=failure,
                )
            if token:
                self._tokens[(region, token)] = (fingerprint, ids)
            return status, headers, ec2xml.pending_run_response(body)

    def _take_launch_failure(self, instance_type: str, zone: str) -> tuple[str, str] | None:
        for rule in list(self.launch_failures):
            if rule.get("instance_type") not in (None, instance_type) or rule.get("zone") not in (None, zone):
                continue
            rule["count"] = int(rule.get("count", 1)) - 1
            if rule["count"] <= 0:
                self.launch_failures.remove(rule)
            return LAUNCH_FAILURES[str(rule["code"])]
        return None

    def _check_launch(self, region: str, params: dict[str, str]) -> tuple[Reply | None, Any, tuple[str, str, str, float]]:
        instance_type = params.get("InstanceType", "m1.small")
        zone = params.get("Placement.AvailabilityZone") or ""
        nothing = ("", "", "", 0.0)
        if self.require_imdsv2 and params.get("MetadataOptions.HttpTokens") != "required":
            return error("UnauthorizedOperation", (
                "You are not authorized to perform this operation. User: arn:aws:iam::"
                f"{self.fleet.account}:user/gpuhop is not authorized to perform: ec2:RunInstances on resource: "
                f"arn:aws:ec2:{region}:{self.fleet.account}:instance/* with an explicit deny in a service control policy. "
                "Encoded authorization failure message: c2ltdWxhdGVkIFNDUCBkZW5pYWw6IE1ldGFkYXRhSHR0cFRva2VucyE9cmVxdWlyZWQ"
            )), None, nothing
        if not params.get("SubnetId") and not self._default_vpc(region):
            return error("VPCIdNotSpecified", "No default VPC for this user. GroupName is only supported for EC2-Classic and default VPC."), None, nothing
        if params.get("SubnetId"):
            subnet = _subnet(self.fleet.backend(region), params["SubnetId"])
            if subnet is None:
                return error("InvalidSubnetID.NotFound", f"The subnet ID '{params['SubnetId']}' does not exist"), None, nothing
            if zone and zone != subnet.availability_zone:
                return error("InvalidParameterValue", f"Value ({zone}) for parameter availabilityZone is invalid. Subnet '{params['SubnetId']}' is in the availability zone {subnet.availability_zone}"), None, nothing
            zone = subnet.availability_zone
        zone = zone or f"{region}a"
        market = "spot" if params.get("InstanceMarketOptions.MarketType") == "spot" else "on-demand"
        count = max(1, int(params.get("MinCount") or 1))
        try:
            job = parse_job(decode_user_data(params["UserData"])) if params.get("UserData") else None
        except UserDataError as exc:
            return error("InvalidParameterValue", str(exc)), None, nothing
        if self.catalog.zones.get(zone) != region:
            return error("InvalidParameterValue", f"Invalid availability zone: [{zone}]"), None, nothing
        offer = self.catalog.offer(instance_type, zone)
        if offer is None:
            return error("Unsupported", f"Your requested instance type ({instance_type}) is not supported in your requested Availability Zone ({zone})."), None, nothing
        quota = self.quotas.limit(region, market, instance_type)
        vcpus = self.catalog.types[instance_type].vcpu * count
        if quota is not None and self.fleet.vcpus_in_use(region, market, instance_type) + vcpus > quota:
            if market == "spot":
                return error("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded"), None, nothing
            return error("VcpuLimitExceeded", f"You have requested more vCPU capacity than your current vCPU limit of {quota} allows for the instance bucket that the specified instance type belongs to. Please visit http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit."), None, nothing
        free = offer.capacity.get(market, 0) - self.fleet.in_use(instance_type, zone, market)
        if free < count:
            others = [z for z, r in self.catalog.zones.items() if r == region and z != zone]
            return error("InsufficientInstanceCapacity", f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested ({zone}). Our system will be working on provisioning additional capacity. You can currently get {instance_type} capacity by not specifying an Availability Zone in your request or choosing {', '.join(others)}."), None, nothing
        price = self.catalog.price(instance_type, zone, market)
        if market == "spot":
            on_demand = self.catalog.on_demand_price(instance_type, region) or price
            raw = params.get("InstanceMarketOptions.SpotOptions.MaxPrice")
            try:
                max_price = float(raw) if raw else on_demand
            except ValueError:
                return error("InvalidParameterValue", f"Invalid max price: {raw}"), None, nothing
            if max_price < price:
                return error("SpotMaxPriceTooLow", f"Your Spot request price of {max_price} is lower than the minimum required Spot request fulfillment price of {price}."), None, nothing
        return None, job, (instance_type, zone, market, price)

    def _default_vpc(self, region: str) -> bool:
        return any(getattr(vpc, "is_default", False) for vpc in self.fleet.backend(region).vpcs.values())

    # ------------------------------------------------------------------ prices

    def spot_price_history(self, region: str, params: dict[str, str]) -> Reply:
        types = set(ec2xml.indexed(params, "InstanceType"))
        zones = {params["AvailabilityZone"]} if params.get("AvailabilityZone") else set()
        products = set(ec2xml.indexed(params, "ProductDescription"))
        i = 1
        while f"Filter.{i}.Name" in params:
            values = set(ec2xml.indexed(params, f"Filter.{i}.Value"))
            name = params[f"Filter.{i}.Name"]
            if name == "instance-type":
                types |= values
            elif name == "availability-zone":
                zones |= values
            elif name == "product-description":
                products |= values
            i += 1
        if products and not products & {"Linux/UNIX", "Linux/UNIX (Amazon VPC)"}:
            return reply(200, ec2xml.spot_price_history_xml([], ""))
        region_zones = {z for z, r in self.catalog.zones.items() if r == region}
        zones = (zones & region_zones) if zones else region_zones
        try:
            start = _parse_time(params.get("StartTime"))
            end = _parse_time(params.get("EndTime"))
        except ValueError:
            return error("InvalidParameterValue", "Invalid StartTime or EndTime")
        rows = self.catalog.spot_history(types, zones, start, end)
        offset = int(params.get("NextToken") or 0)
        limit = max(1, min(1000, int(params.get("MaxResults") or 1000)))
        page = rows[offset : offset + limit]
        token = str(offset + limit) if offset + limit < len(rows) else ""
        return reply(200, ec2xml.spot_price_history_xml(page, token))

    # ------------------------------------------------------------------ the serial console

    def console_output(self, params: dict[str, str]) -> Reply | None:
        """What the instance printed, base64 as EC2 sends it (botocore decodes it): the last
        64 KB as posted at boot and at the end, or as of now with `Latest=true`."""
        rec = self.fleet.instances.get(params.get("InstanceId", ""))
        if rec is None:
            return None  # moto answers unknown ids
        latest = params.get("Latest", "").lower() == "true"
        output = self.fleet.console(rec, latest=latest)
        encoded = base64.b64encode(output).decode("ascii") if output else ""
        return reply(200, ec2xml.console_output_xml(rec.instance_id, encoded))

    # ------------------------------------------------------------------ volumes and endings

    async def attach_volume(self, region: str, params: dict[str, str], forward: Forward) -> Reply:
        backend = self.fleet.backend(region)
        volume_id, instance_id = params.get("VolumeId", ""), params.get("InstanceId", "")
        volume = backend.volumes.get(volume_id)
        try:
            instance = backend.get_instance(instance_id)
        except InvalidInstanceIdError:
            instance = None
        if volume is None or instance is None:
            return await forward()  # moto answers the NotFound errors
        state = instance._state.name
        if state not in ("running", "stopped"):
            return error("IncorrectState", f"Instance '{instance_id}' is not 'running'.")
        if volume.zone.name != instance.placement.zone:
            return error("InvalidVolume.ZoneMismatch", f"The volume '{volume_id}' is not in the same availability zone as instance '{instance_id}'")
        if volume.attachment is not None:
            return error("VolumeInUse", f"{volume_id} is already attached to an instance")
        return await forward()

    async def terminate_instances(self, params: dict[str, str], forward: Forward) -> Reply:
        ids = ec2xml.indexed(params, "InstanceId")
        records = [self.fleet.instances.get(i) for i in ids]
        if not ids or any(r is None for r in records):
            return await forward()  # moto answers unknown ids (InvalidInstanceID.NotFound)
        changes = []
        for rec in records:
            assert rec is not None
            previous = self.fleet.end(rec, USER_SHUTDOWN, stop=False)
            current = (rec.moto._state.code, rec.moto._state.name)
            changes.append((rec.instance_id, previous, current))
        return reply(200, ec2xml.terminate_xml(changes))


def filters(params: dict[str, str]) -> dict[str, list[str]]:
    """A request's `Filter.N.Name` / `Filter.N.Value.M` as name -> values."""
    out: dict[str, list[str]] = {}
    i = 1
    while f"Filter.{i}.Name" in params:
        out.setdefault(params[f"Filter.{i}.Name"], []).extend(ec2xml.indexed(params, f"Filter.{i}.Value"))
        i += 1
    return out


def _subnet(backend: Any, subnet_id: str) -> Any:
    try:
        return backend.get_subnet(subnet_id)
    except Exception:  # moto's InvalidSubnetIdError
        return None


def tag(params: dict[str, str], key: str, resource_type: str | None = None) -> str:
    """The value of tag `key` in a request's TagSpecification list (optionally for one type)."""
    i = 1
    while f"TagSpecification.{i}.ResourceType" in params:
        if resource_type is None or params[f"TagSpecification.{i}.ResourceType"] == resource_type:
            j = 1
            while f"TagSpecification.{i}.Tag.{j}.Key" in params:
                if params[f"TagSpecification.{i}.Tag.{j}.Key"] == key:
                    return params.get(f"TagSpecification.{i}.Tag.{j}.Value", "")
                j += 1
        i += 1
    return ""


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
