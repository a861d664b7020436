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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from moto.ec2.models import ec2_backends
from moto.ec2.models.instances import Instance as MotoInstance
from moto.ec2.models.instances import InstanceState, StateReason
from moto.events.models import events_backends

from simulators.aws.catalog import Catalog
from simulators.aws.ec2xml import iso
from simulators.aws.userdata import JobSpec
from simulators.runtime import Runtime

log = logging.getLogger(__name__)

SPOT_TERMINATION = ("Server.SpotInstanceTermination", "Server.SpotInstanceTermination: Spot instance termination")
SPOT_SHUTDOWN = ("Server.SpotInstanceShutdown", "Server.SpotInstanceShutdown: Spot instance shutdown")
USER_SHUTDOWN = ("Client.UserInitiatedShutdown", "Client.UserInitiatedShutdown: User initiated shutdown")
OS_SHUTDOWN = ("Client.InstanceInitiatedShutdown", "Client.InstanceInitiatedShutdown: Instance initiated shutdown")
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
INTERRUPTION_DETAIL_TYPE = "EC2 Spot Instance Interruption Warning"


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

    def as_json(self, runtime: Runtime) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id, "name": self.name, "region": self.region,
            "zone": self.zone, "instance_type": self.instance_type, "market": self.market,
            "price_per_hour": self.price, "state": self.moto._state.name,
            "state_reason": self.moto.state_reason.code, "job_started": self.started,
            "process_running": runtime.running(self.instance_id),
            "exit_code": runtime.exit_code(self.instance_id), "notice": self.notice,
            "volume_id": self.job.volume_id if self.job else None,
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

    def in_use(self, instance_type: str, zone: str, market: str) -> int:
        return sum(
            1 for r in self.instances.values()
            if r.holds_capacity and (r.instance_type, r.zone, r.market) == (instance_type, zone, market)
        )

    def vcpus_in_use(self, region: str, market: str) -> int:
        return sum(
            self.catalog.types[r.instance_type].vcpu for r in self.instances.values()
            if r.holds_capacity and r.region == region and r.market == market
        )

    def register(
        self, instance_id: str, region: str, zone: str, instance_type: str, market: str,
        price: float, job: JobSpec | None, name: str = "",
    ) -> SimInstance:
        moto = self.backend(region).get_instance(instance_id)
        moto._state = InstanceState("pending", 0)
        rec = SimInstance(
            instance_id, region, zone, instance_type, market, price, name=name, job=job, boot_at=time.time() + self.boot_delay, moto=moto,
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
                self._spawn(self._finish(rec, None, stop=state in ("stopping", "stopped")))
            elif rec.notice_deadline is not None and now >= rec.notice_deadline:
                stop = bool(rec.notice and rec.notice.get("action") in ("stop", "hibernate"))
                self.end(rec, SPOT_SHUTDOWN if stop else SPOT_TERMINATION, stop=stop)
            elif state == "pending" and now >= rec.boot_at:
                rec.moto._state = InstanceState("running", 16)
                self.runtime.ledger.start(rec.instance_id, "instance", rec.price, owner=rec.name)
            elif state == "running" and not rec.started and rec.job and self._volume_ready(rec):
                rec.started = True
                self._spawn(self._start_job(rec, rec.job))
            elif rec.started and rec.notice is None and self.runtime.exit_code(rec.instance_id) is not None:
                # the bootstrap script powers the machine off when the container exits, unless
                # a spot reclaim is pending: then it leaves the end to EC2 (see the adapter)
                stop = rec.moto.instance_initiated_shutdown_behavior == "stop"
                self.end(rec, OS_SHUTDOWN, stop=stop)

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
        rec.moto._state = InstanceState(name, STATE_CODES[name])
        rec.moto.state_reason = StateReason(reason[1], reason[0])
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
            rec.moto.state_reason = StateReason(reason[1], reason[0])
            when = time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime())
            rec.moto._reason = f"{reason[0].split('.')[0]} initiated ({when})"
        rec.holds_capacity = False
        self.runtime.ledger.stop(rec.instance_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ interruptions

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
        }])
        return rec.notice

    def metadata(self, instance_id: str, path: str) -> tuple[int, str]:
        rec = self.instances.get(instance_id)
        if rec is None:
            return 404, "Not Found"
        path = path.strip("/")
        answers: dict[str, str | None] = {
            "latest/meta-data/instance-id": rec.instance_id,
            "latest/meta-data/instance-type": rec.instance_type,
            "latest/meta-data/placement/availability-zone": rec.zone,
            "latest/meta-data/instance-life-cycle": "spot" if rec.market == "spot" else "on-demand",
            "latest/meta-data/spot/instance-action": json.dumps(rec.notice) if rec.notice else None,
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
            self.runtime.ledger.stop(rec.instance_id)
