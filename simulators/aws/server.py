"""The AWS simulator: moto's server for the EC2, SQS, EventBridge and STS wire protocols, behind
a front server that adds what moto lacks (prices, capacity, zone checks, idempotency, spot
interruptions and rebalance recommendations, instances that run their job, IMDSv2, GPU vCPU
quotas and the Service Quotas API that reports them) and the `/_sim/` admin API.

boto3 talks to the front server's URL as its `endpoint_url`. The front server reads each
request's SigV4 credential scope to learn the service and region; EC2 Query-API calls go
through `ec2.Ec2Front`, which answers some itself and forwards the rest to moto, which runs in
a thread of this process (so the simulator can reach moto's backend objects directly).

A request AWS has accepted is carried out even when its client gives up waiting (a read
timeout): each one is handled in a task of its own that a dropped connection does not cancel.
Injected faults (faults.py) apply to EC2 and, when a rule names them, to SQS and EventBridge.

moto keeps its state in process-wide globals. Each simulator therefore uses its own random
AWS account id, forced onto every request it forwards (`x-moto-account-id`), and drops that
account's state when it stops: two simulators in one process do not see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from moto.core.base_backend import BackendDict
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from simulators.aws import admin, ec2xml
from simulators.aws.catalog import Catalog
from simulators.aws.ec2 import Ec2Front, Reply
from simulators.aws.faults import AUTH_STATUS, Faults, error_message
from simulators.aws.fleet import Fleet
from simulators.runtime import Runtime

log = logging.getLogger(__name__)

_SCOPE = re.compile(r"Credential=[^/,\s]*/\d{8}/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request")
_ACCESS_KEY = re.compile(r"Credential=([^/,\s]*)/")
_HOP = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "keep-alive"}
_HOP_RESPONSE = {"content-length", "transfer-encoding", "connection", "content-encoding", "date", "server"}


class AwsSimulator:
    """In-process AWS (EC2 + SQS + EventBridge) for tests and the demo.

    `await sim.start()` returns the endpoint URL for boto3 (any credentials work);
    `await sim.stop()` kills every job process and discards this simulator's moto state."""

    def __init__(
        self,
        state_dir: Path,
        catalog_path: Path | None = None,
        notice_seconds: float = 120.0,
        boot_delay: float = 1.0,
        shutdown_grace: float = 5.0,
        account_id: str | None = None,
        require_imdsv2: bool = False,
        default_vpc: bool = True,
    ) -> None:
        """`require_imdsv2`: refuse RunInstances without MetadataOptions.HttpTokens=required, as
        an organisation's SCP does. `default_vpc=False`: an account without default VPCs."""
        self.account_id = account_id or "".join(random.choice("0123456789") for _ in range(12))
        self.catalog = Catalog.load(catalog_path)
        self.runtime = Runtime(Path(state_dir))
        self.fleet = Fleet(
            self.runtime, self.catalog, self.account_id, boot_delay=boot_delay,
            notice_seconds=notice_seconds, shutdown_grace=shutdown_grace,
        )
        self.faults = Faults()
        self.ec2 = Ec2Front(self.catalog, self.fleet, self.faults)
        self.ec2.require_imdsv2 = require_imdsv2
        self._default_vpc = default_vpc
        self.url = ""
        self._moto: ThreadedMotoServer | None = None
        self._moto_url = ""
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[Reply]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        await asyncio.to_thread(self._moto.start)
        moto_host, moto_port = self._moto.get_host_and_port()
        self._moto_url = f"http://{moto_host}:{moto_port}"
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        )
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.add_routes(admin.routes(self.fleet, self.ec2))
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.url = f"http://{host}:{bound[1]}"
        self.fleet.metadata_base = f"{self.url}/_sim/metadata"
        if not self._default_vpc:
            for region in self.catalog.regions:
                self.fleet.remove_default_vpc(region)
        self._loop_task = asyncio.get_running_loop().create_task(self.fleet.run())
        return self.url

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self.fleet.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._moto is not None:
            await asyncio.to_thread(self._moto.stop)
        self._forget_account()
        self._runner = self._session = self._moto = self._loop_task = None

    def requests_in_flight(self) -> int:
        """API requests accepted and not yet carried out (some may have lost their client)."""
        return len(self._handling)

    def _forget_account(self) -> None:
        for backends in list(BackendDict._instances):  # type: ignore[misc]
            account_backend = backends.get(self.account_id)
            if account_backend is not None:
                with contextlib.suppress(Exception):
                    account_backend.reset()
                with contextlib.suppress(KeyError):
                    del backends[self.account_id]

    # ------------------------------------------------------------------ the wire

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        task = asyncio.get_running_loop().create_task(
            self._handle(request.method, request.path_qs, request.query_string, request.headers.copy(), body)
        )
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)
        status, headers, data = await asyncio.shield(task)  # carried out even if the client goes
        return web.Response(status=status, headers=headers, body=data)

    async def _handle(self, method: str, path_qs: str, query: str, headers: Mapping[str, str], body: bytes) -> Reply:
        service, region = _scope(headers.get("Authorization", ""))
        caller = _caller(headers)

        async def forward(params: dict[str, str] | None = None) -> Reply:
            """To moto, as received or (EC2) with `params` instead of the request's."""
            data = urlencode(params).encode() if params is not None else body
            return await self._forward(method, path_qs, headers, data)

        if service == "ec2":
            try:
                return await self.ec2.handle(region, ec2xml.parse_params(query, body), forward, self._describe, caller)
            except Exception:  # a simulator bug must still look like EC2 to the client
                log.exception("aws simulator: EC2 request failed")
                code, text = ec2xml.error_xml("InternalError", "An internal error has occurred")
                return code, {"Content-Type": "text/xml;charset=UTF-8"}, text.encode()
        target = headers.get("X-Amz-Target", "")
        action = target.rsplit(".", 1)[-1] if target else ec2xml.parse_params(query, body).get("Action", "")
        fault = self.faults.take(action, service)
        if fault is not None:
            await asyncio.sleep(fault.delay if fault.code in ("timeout", "latency") else 0)
            if fault.code != "latency":
                if fault.code == "timeout":
                    return _json_error("InternalError", "An internal error has occurred")
                return _json_error(fault.code, error_message(fault, caller))
        if service == "servicequotas":  # moto serves it for VPC only
            return self.ec2.quotas.handle(region, self.account_id, target, body)
        return await forward()

    async def _forward(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> Reply:
        assert self._session is not None
        out = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        out["Host"] = self.url.removeprefix("http://")  # moto builds queue URLs from it
        out["x-moto-account-id"] = self.account_id
        async with self._session.request(method, self._moto_url + path_qs, data=body, headers=out) as resp:
            data = await resp.read()
            reply_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_RESPONSE}
            return resp.status, reply_headers, data

    async def _describe(self, region: str, instance_ids: list[str]) -> Reply:
        form = {"Action": "DescribeInstances", "Version": "2016-11-15"}
        form.update({f"InstanceId.{i}": iid for i, iid in enumerate(instance_ids, 1)})
        body = "&".join(f"{k}={v}" for k, v in form.items()).encode()
        headers = {
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
            "Authorization": f"AWS4-HMAC-SHA256 Credential=gpuhopsim/20250101/{region}/ec2/aws4_request, SignedHeaders=host, Signature=0",
        }
        return await self._forward("POST", "/", headers, body)


def _caller(headers: Mapping[str, str]) -> str:
    """The credentials a request carries in the clear: its access key id and session token."""
    match = _ACCESS_KEY.search(headers.get("Authorization", ""))
    parts = [match.group(1)] if match else []
    if headers.get("X-Amz-Security-Token"):
        parts.append(headers["X-Amz-Security-Token"])
    return " ".join(parts)


def _json_error(code: str, message: str) -> Reply:
    """An error as the JSON protocols (SQS, EventBridge) send it."""
    status = AUTH_STATUS.get(code) or ec2xml.ERROR_STATUS.get(code, 400)
    headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-query-error": f"{code};Sender"}
    return status, headers, json.dumps({"__type": code, "message": message}).encode()


def _scope(authorization: str) -> tuple[str, str]:
    """(service, region) from a SigV4 Authorization header."""
    match = _SCOPE.search(authorization)
    if match is None:
        return "", "us-east-1"
    return match.group(2), match.group(1)
