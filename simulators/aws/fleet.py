"""The lifecycle moto does not have: instances that boot, run their job as a local process, get a
spot interruption notice, and shut down, with capacity taken and given back and every second
billed.

moto keeps the EC2 records (state, tags, volumes) and answers the API; this module holds the
simulator's own record of each instance it launched and a small loop that moves the moto record
along: pending -> running after the boot delay; the job's process starts once running and, when
the job expects an EBS volume, once that volume is attached; when the process ends the instance
shuts itself down (the bootstrap script ends with `shutdown -h now`) unless a spot notice is
pending; after an interruption notice the instance is reclaimed with
`Server.SpotInstanceTermination` (the job got no signal from it: the agent reads the notice from
the metadata URL; the reclaim itself is an OS shutdown, SIGTERM then SIGKILL).

The notice period is the simulator's setting (120 s, EC2's, unless told otherwise): the
instance-action time is the warning's time plus that notice. The EventBridge warning carries
only its own time, from which a client reckons the reclaim as EC2 promises it, two minutes
later; so the event is dated two minutes before the instance-action time, and a client reckons
the very moment the simulator reclaims at. With a shorter notice that date is in the past, as
for a warning delivered late, which is what a short notice amounts to.

The instance metadata service (IMDS) is served per instance under the simulator's admin API,
as EC2 serves it at 169.254.169.254: IMDSv2 session tokens (`PUT latest/api/token` with
`X-aws-ec2-metadata-token-ttl-seconds`, 1-21600), and when the instance was launched with
`HttpTokens=required` a read without a valid token is refused with 401, as EC2 does. It answers
the spot notice (`spot/instance-action`) and the rebalance recommendation
(`events/recommendations/rebalance`, `{"noticeTime": ...}`); both 404 until there is one.

A launch can be told to fail after EC2 accepted it (`launch_failure`): the instance goes
pending -> terminated at boot with `Server.InsufficientInstanceCapacity` or
`Server.InternalError`, never runs and is never billed.

What the instance prints is its serial console (boot lines, then the bootstrap's and the agent's
output, as cloud-init passes user-data output to the console), served by GetConsoleOutput as EC2
posts it: at boot and once the instance has ended, not while it shuts down. Billing follows
billing.py, from the same whole-second times the API reports (LaunchTime, StateTransitionReason).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from moto.ec2.models import ec2_backends
from moto.ec2.models.instances import Instance as MotoInstance
from moto.ec2.models.instances import InstanceState, StateReason
from moto.events.models import events_backends

from simulators.aws import billing
from simulators.aws.catalog import Catalog
from simulators.aws.ec2xml import iso
from simulators.aws.quotas import family_of
from simulators.aws.userdata import JobSpec
from simulators.runtime import Runtime

log = logging.getLogger(__name__)


class _EndedInstance(MotoInstance):
    """A moto instance the simulator ended for a reason of EC2's own (spot reclaim, shutdown
    from inside, a failed boot): its StateReason stays what EC2 said, whatever moto writes
    afterwards. moto's terminate() sets state, then its own "Client.UserInitiatedShutdown", and
    DescribeInstances is served from other threads meanwhile: without the pin a caller could
    read a reason EC2 never gives (a flaky test showed one)."""

    @property  # type: ignore[override]
    def state_reason(self) -> StateReason:
        pinned: StateReason | None = self.__dict__.get("_sim_pinned_reason")
        return pinned if pinned is not None else self.__dict__["_sim_reason"]

    @state_reason.setter
    def state_reason(self, value: StateReason) -> None:
        self.__dict__["_sim_reason"] = value


def pin_reason(instance: MotoInstance, reason: tuple[str, str]) -> None:
    """Fix the instance's StateReason to (code, message) before its state changes."""
    fixed = StateReason(reason[1], reason[0])
    instance.__dict__["_sim_reason"] = fixed
    instance.__dict__["_sim_pinned_reason"] = fixed
    instance.__class__ = _EndedInstance  # type: ignore[type-abstract]

SPOT_TERMINATION = ("Server.SpotInstanceTermination", "Server.SpotInstanceTermination: Spot instance termination")
SPOT_SHUTDOWN = ("Server.SpotInstanceShutdown", "Server.SpotInstanceShutdown: Spot instance shutdown")
USER_SHUTDOWN = ("Client.UserInitiatedShutdown", "Client.UserInitiatedShutdown: User initiated shutdown")
OS_SHUTDOWN = ("Client.InstanceInitiatedShutdown", "Client.InstanceInitiatedShutdown: Instance initiated shutdown")
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
INTERRUPTION_DETAIL_TYPE = "EC2 Spot Instance Interruption Warning"
REBALANCE_DETAIL_TYPE = "EC2 Instance Rebalance Recommendation"
EC2_NOTICE_SECONDS = 120.0  # EC2's warning comes two minutes before the reclaim; clients count on it
LAUNCH_FAILURES = {  # what EC2 puts in StateReason when a launch fails after it was accepted
    "Server.InsufficientInstanceCapacity": (
        "Server.InsufficientInstanceCapacity",
        "Server.InsufficientInstanceCapacity: Insufficient capacity to satisfy instance request",
    ),
    "Server.InternalError": ("Server.InternalError", "Server.InternalError: Internal error on launch"),
}
IMDS_TTL_MAX = 21600
CONSOLE_LIMIT = 64 * 1024  # EC2 keeps the last 64 KB of console output
BOOT_LINES = (
    "[    0.000000] Linux version 6.8.0-1021-aws (gpuhop simulated EC2) #23-Ubuntu SMP\n"
    "[    3.102311] cloud-init[611]: Cloud-init v. 24.4 running 'init' at {when}.\n"
    "[    6.870120] cloud-init[802]: Cloud-init v. 24.4 running 'modules:final' at {when}.\n"
)


@dataclass
class SimInstance:
    instance_id: str
    region: str
    zone: str
    instance_type: str
    market: str  # "spot" or "on-demand"
    price: float  # USD/hour billed while running
    name: str
    job: JobSpec | None
    boot_at: float
    moto: MotoInstance
    holds_capacity: bool = True
    started: bool = False  # the job's process was started
    ending: bool = False  # a shutdown is under way or done
    notice: dict[str, str] | None = None
    notice_deadline: float | None = None
    billing_started: float | None = None  # whole seconds: entered running (its LaunchTime)
    billing_stopped: float | None = None  # whole seconds: left running (its StateTransitionReason)
    transition_reason: str = ""
    console: bytes = b""  # the console output as last posted (at boot, at the end)
    http_tokens: str = "optional"  # MetadataOptions.HttpTokens: "required" = IMDSv2 only
    hop_limit: int = 1
    launch_failure: tuple[str, str] | None = None  # ends at boot with this StateReason
    rebalance: dict[str, str] | None = None  # a rebalance recommendation, once made
    imds_tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (unix)
    imds_log: list[tuple[str, int]] = field(default_factory=list)  # (path, status) served

    def bill(self, catalog: Catalog, now: float) -> tuple[int, float]:
        """(billed seconds, USD) so far, by billing.py's rule."""
        if self.billing_started is None:
            return 0, 0.0
        stopped = self.billing_stopped if self.billing_stopped is not None else float(int(now))
        offer = catalog.offer(self.instance_type, self.zone)
        history = offer.spot_history if self.market == "spot" and offer is not None else [(0.0, self.price)]
        return billing.billed_seconds(self.billing_started, stopped), billing.cost(self.billing_started, stopped, history)

    def as_json(self, runtime: Runtime) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id, "name": self.name, "region": self.region,
            "zone": self.zone, "instance_type": self.instance_type, "market": self.market,
            "price_per_hour": self.price, "state": self.moto._state.name,
            "state_reason": self.moto.state_reason.code, "job_started": self.started,
            "process_running": runtime.running(self.instance_id),
            "exit_code": runtime.exit_code(self.instance_id), "notice": self.notice,
            "volume_id": self.job.volume_id if self.job else None,
            "http_tokens": self.http_tokens, "rebalance": self.rebalance,
        }


class Fleet:
    """Every instance this simulator launched, and the loop that drives their lifecycle."""

    def __init__(
        self, runtime: Runtime, catalog: Catalog, account: str, *, boot_delay: float,
        notice_seconds: float, shutdown_grace: float, tick: float = 0.05,
    ) -> None:
        self.runtime = runtime
        self.catalog = catalog
        self.account = account
        self.boot_delay = boot_delay
        self.notice_seconds = notice_seconds
        self.shutdown_grace = shutdown_grace
        self.tick_seconds = tick
        self.metadata_base = ""  # set once the server knows its URL
        self.instances: dict[str, SimInstance] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def backend(self, region: str) -> Any:
        return ec2_backends[self.account][region]

    def remove_default_vpc(self, region: str) -> None:
        """An account without a default VPC (deleted, or never made, as in many organisations):
        the default VPC and its subnets stay, as an ordinary VPC with ordinary subnets."""
        backend = self.backend(region)
        for vpc in list(backend.vpcs.values()):
            if getattr(vpc, "is_default", False):
                vpc.is_default = False
                for zone_subnets in backend.subnets.values():
                    for subnet in zone_subnets.values():
                        if subnet.vpc_id == vpc.id:
                            subnet.default_for_az = False

    def in_use(self, instance_type: str, zone: str, market: str) -> int:
        return sum(
            1 for r in self.instances.values()
            if r.holds_capacity and (r.instance_type, r.zone, r.market) == (instance_type, zone, market)
        )

    def vcpus_in_use(self, region: str, market: str, instance_type: str) -> int:
        """vCPUs counted against the quota `instance_type` draws from (its family's, per market)."""
        family = family_of(instance_type)
        return sum(
            self.catalog.types[r.instance_type].vcpu for r in self.instances.values()
            if r.holds_capacity and r.region == region and r.market == market and family_of(r.instance_type) == family
        )

    def register(
        self, instance_id: str, region: str, zone: str, instance_type: str, market: str,
        price: float, job: JobSpec | None, name: str = "", http_tokens: str = "optional", hop_limit: int = 1,
        launch_failure: tuple[str, str] | None = None,
    ) -> SimInstance:
        moto = self.backend(region).get_instance(instance_id)
        moto._state = InstanceState("pending", 0)
        rec = SimInstance(
            instance_id, region, zone, instance_type, market, price, name=name, job=job, boot_at=time.time() + self.boot_delay, moto=moto,
            http_tokens=http_tokens, hop_limit=hop_limit, launch_failure=launch_failure,
        )
        self.instances[instance_id] = rec
        return rec

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # one bad record must not stop the data center
                log.exception("aws simulator: lifecycle tick failed")
            await asyncio.sleep(self.tick_seconds)

    def tick(self) -> None:
        now = time.time()
        for rec in list(self.instances.values()):
            if rec.ending:
                continue
            state = rec.moto._state.name
            if state in ("stopping", "stopped", "shutting-down", "terminated"):
                rec.ending = True  # stopped or terminated through the API, passed to moto
                self._stop_billing(rec, "User")
                self._spawn(self._finish(rec, None, stop=state in ("stopping", "stopped")))
            elif rec.notice_deadline is not None and now >= rec.notice_deadline:
                stop = bool(rec.notice and rec.notice.get("action") in ("stop", "hibernate"))
                self.end(rec, SPOT_SHUTDOWN if stop else SPOT_TERMINATION, stop=stop)
            elif state == "pending" and now >= rec.boot_at and rec.launch_failure is not None:
                self.end(rec, rec.launch_failure, stop=False)  # never ran: never billed
            elif state == "pending" and now >= rec.boot_at:
                rec.moto._state = InstanceState("running", 16)
                self._start_billing(rec, now)
            elif state == "running" and not rec.started and rec.job and self._volume_ready(rec):
                rec.started = True
                self._spawn(self._start_job(rec, rec.job))
            elif rec.started and rec.notice is None and self.runtime.exit_code(rec.instance_id) is not None:
                # the bootstrap script powers the machine off when the container exits, unless
                # a spot reclaim is pending: then it leaves the end to EC2 (see the adapter)
                stop = rec.moto.instance_initiated_shutdown_behavior == "stop"
                self.end(rec, OS_SHUTDOWN, stop=stop)

    def _start_billing(self, rec: SimInstance, now: float) -> None:
        started = float(int(now))
        rec.billing_started = started
        # moto keeps naive UTC datetimes; EC2 reports whole seconds
        rec.moto.launch_time = datetime.fromtimestamp(started, UTC).replace(tzinfo=None)
        boot = BOOT_LINES.format(when=time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(started))).encode()
        with open(self.runtime.log_path(rec.instance_id), "ab") as log_file:
            log_file.write(boot)
        rec.console = boot

    def _stop_billing(self, rec: SimInstance, who: str) -> None:
        if rec.billing_stopped is not None:
            return
        stopped = float(int(time.time()))
        if rec.billing_started is not None:
            rec.billing_stopped = max(stopped, rec.billing_started)
        when = time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(stopped))
        rec.transition_reason = f"{who} initiated ({when})"
        rec.moto._reason = rec.transition_reason

    def console(self, rec: SimInstance, latest: bool = False) -> bytes:
        """The console output EC2 would serve now (the last 64 KB)."""
        if not latest:
            return rec.console
        path = self.runtime.log_path(rec.instance_id)
        return _tail(path.read_bytes()) if path.exists() else b""

    def _volume_ready(self, rec: SimInstance) -> bool:
        if rec.job is None or not rec.job.volume_id:
            return True
        volume = self.backend(rec.region).volumes.get(rec.job.volume_id)
        attachment = getattr(volume, "attachment", None)
        return attachment is not None and attachment.instance.id == rec.instance_id

    async def _start_job(self, rec: SimInstance, job: JobSpec) -> None:
        env = dict(job.env)
        if "GPUHOP_METADATA_URL" in env:  # the job reads instance metadata: give it this instance's
            env["GPUHOP_METADATA_URL"] = f"{self.metadata_base}/{rec.instance_id}/latest/meta-data/spot/instance-action"
        try:
            await self.runtime.start(rec.instance_id, job.command, env, volume_id=job.volume_id)
        except OSError:
            log.exception("aws simulator: cannot start the job of %s", rec.instance_id)
            self.end(rec, OS_SHUTDOWN, stop=False)

    # ------------------------------------------------------------------ endings

    def end(self, rec: SimInstance, reason: tuple[str, str], *, stop: bool) -> tuple[int, str]:
        """Begin shutting the instance down; returns its previous (code, state)."""
        previous = (rec.moto._state.code, rec.moto._state.name)
        if rec.ending:
            return previous
        rec.ending = True
        name = "stopping" if stop else "shutting-down"
        pin_reason(rec.moto, reason)  # before the state: no reader sees the new state without it
        rec.moto._state = InstanceState(name, STATE_CODES[name])
        self._stop_billing(rec, "User" if reason == USER_SHUTDOWN else reason[0].split(".")[0])
        self._spawn(self._finish(rec, reason, stop=stop))
        return previous

    async def _finish(self, rec: SimInstance, reason: tuple[str, str] | None, *, stop: bool) -> None:
        await self.runtime.kill(rec.instance_id, grace=self.shutdown_grace)
        if reason is not None:
            backend = self.backend(rec.region)
            if stop:
                rec.moto.stop()
            else:
                backend.terminate_instances([rec.instance_id])  # detaches its volumes
        rec.moto._reason = rec.transition_reason  # moto writes its own; EC2 keeps the first
        rec.holds_capacity = False
        path = self.runtime.log_path(rec.instance_id)
        if path.exists():  # EC2 posts the console once the instance has ended
            rec.console = _tail(path.read_bytes())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ interruptions

    def backdate(self, instance_id: str, seconds: int) -> None:
        """Move a running instance's start `seconds` into the past, in EC2's LaunchTime and the
        ledger alike (whole seconds, as both keep it)."""
        rec = self.instances[instance_id]
        if rec.billing_started is None or rec.billing_stopped is not None or seconds < 0:
            raise ValueError(f"{instance_id} is not running, or {seconds} is negative")
        rec.billing_started -= seconds
        rec.moto.launch_time = datetime.fromtimestamp(rec.billing_started, UTC).replace(tzinfo=None)

    def interrupt(self, instance_id: str, notice_seconds: float | None, action: str) -> dict[str, str]:
        rec = self.instances[instance_id]
        if rec.ending or rec.moto._state.name not in ("pending", "running"):
            raise ValueError(f"{instance_id} is {rec.moto._state.name}")
        if rec.market != "spot":
            raise ValueError(f"{instance_id} is an on-demand instance; only spot is interrupted")
        if rec.notice is not None:
            return rec.notice
        notice = self.notice_seconds if notice_seconds is None else notice_seconds
        deadline = time.time() + max(0.0, notice)
        rec.notice = {"action": action, "time": iso(deadline).replace(".000Z", "Z")}
        rec.notice_deadline = deadline
        detail = {"instance-id": instance_id, "instance-action": action}
        events_backends[self.account][rec.region].put_events([{
            "Source": "aws.ec2", "DetailType": INTERRUPTION_DETAIL_TYPE, "Detail": json.dumps(detail),
            "Resources": [f"arn:aws:ec2:{rec.zone}:instance/{instance_id}"],
            # dated so that its time + EC2's two minutes is the instance-action time (see above)
            "Time": deadline - EC2_NOTICE_SECONDS,
        }])
        return rec.notice

    def recommend_rebalance(self, instance_id: str) -> dict[str, str]:
        """EC2's signal that a spot instance is at elevated risk of interruption: an EventBridge
        event and the IMDS item; it may or may not be followed by an interruption."""
        rec = self.instances[instance_id]
        if rec.ending or rec.moto._state.name not in ("pending", "running"):
            raise ValueError(f"{instance_id} is {rec.moto._state.name}")
        if rec.market != "spot":
            raise ValueError(f"{instance_id} is an on-demand instance; only spot gets rebalance recommendations")
        if rec.rebalance is None:
            rec.rebalance = {"noticeTime": iso(time.time()).replace(".000Z", "Z")}
            events_backends[self.account][rec.region].put_events([{
                "Source": "aws.ec2", "DetailType": REBALANCE_DETAIL_TYPE,
                "Detail": json.dumps({"instance-id": instance_id}),
                "Resources": [f"arn:aws:ec2:{rec.zone}:instance/{instance_id}"],
            }])
        return rec.rebalance

    def metadata_token(self, instance_id: str, ttl_header: str | None) -> tuple[int, str]:
        """PUT latest/api/token: a session token valid for the asked seconds (1-21600)."""
        rec = self.instances.get(instance_id)
        if rec is None:
            return 404, "Not Found"
        try:
            ttl = int(ttl_header or "")
        except ValueError:
            return 400, "Bad Request"  # EC2: the TTL header is required and must be an integer
        if not 1 <= ttl <= IMDS_TTL_MAX:
            return 400, "Bad Request"
        token = secrets.token_urlsafe(40)
        now = time.time()
        rec.imds_tokens = {t: exp for t, exp in rec.imds_tokens.items() if exp > now}
        rec.imds_tokens[token] = now + ttl
        return 200, token

    def metadata(self, instance_id: str, path: str, token: str | None = None) -> tuple[int, str]:
        rec = self.instances.get(instance_id)
        if rec is None:
            return 404, "Not Found"
        path = path.strip("/")
        status, text = self._metadata(rec, path, token)
        rec.imds_log.append((path, status))
        del rec.imds_log[:-200]
        return status, text

    def _metadata(self, rec: SimInstance, path: str, token: str | None) -> tuple[int, str]:
        if token is not None:
            if rec.imds_tokens.get(token, 0.0) <= time.time():
                return 401, "Unauthorized"  # an expired or unknown token is refused, v1 or not
        elif rec.http_tokens == "required":
            return 401, "Unauthorized"
        answers: dict[str, str | None] = {
            "latest/meta-data/instance-id": rec.instance_id,
            "latest/meta-data/instance-type": rec.instance_type,
            "latest/meta-data/placement/availability-zone": rec.zone,
            "latest/meta-data/instance-life-cycle": "spot" if rec.market == "spot" else "on-demand",
            "latest/meta-data/spot/instance-action": json.dumps(rec.notice) if rec.notice else None,
            "latest/meta-data/events/recommendations/rebalance": json.dumps(rec.rebalance) if rec.rebalance else None,
        }
        value = answers.get(path)
        return (200, value) if value is not None else (404, "Not Found")

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.runtime.shutdown()
        for rec in self.instances.values():
            rec.holds_capacity = False
            self._stop_billing(rec, "User")

    def ledger_rows(self, now: float) -> list[dict[str, Any]]:
        """Every instance's bill, in the shape of the runtime ledger's rows."""
        rows = []
        for rec in self.instances.values():
            seconds, usd = rec.bill(self.catalog, now)
            rows.append({
                "id": rec.instance_id, "kind": "instance", "owner": rec.name, "market": rec.market,
                "price_per_hour": rec.price, "started": rec.billing_started, "stopped": rec.billing_stopped,
                "running": rec.billing_started is not None and rec.billing_stopped is None,
                "billed_seconds": seconds, "cost_usd": round(usd, 6),
            })
        return rows


def _tail(data: bytes) -> bytes:
    return data[-CONSOLE_LIMIT:]
