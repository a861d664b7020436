"""The RunPod simulator's HTTP side: `POST /graphql` and REST v2 (`/v2/...`, see rest.py) as
RunPod serves them, over one world, plus an admin API.

`/graphql` checks the bearer key (HTTP 401 otherwise), executes the query against the real
schema in `schema.py` (inline arguments or `$variables`), and returns errors the way RunPod does:
HTTP 200 with `{"errors": [{"message": ...}]}`. Injected faults (500, 429, a GraphQL error, a
hang that never executes the query) hit `/graphql` and `/v2/` alike (over REST as problem+json;
a "graphql" fault is a 400 problem there, or a 500 when its message says "went wrong"); with
`"echo": true` a fault's answer
repeats the request's URL and Authorization header, as a careless error page could, so that
redaction can be tested. Injected latency delays an operation (by its root field, e.g.
`gpuTypes`, `podFindAndDeployOnDemand`, a REST operation such as `createPod` / `listPods` /
`catalogGpus` (rest.operation), or `*` for all) and then carries it out even when the
client has given up and gone, as the real service does. `/_sim/*` is the simulator's own admin
API (no auth):

    POST   /_sim/pods/{id}/preempt   {"notice_seconds"?, "wait"?, "cause"?: host|outbid|runpod}
                                      (default: outbid for an interruptible pod, else host:
                                      "Machine offline", the host went away)
    POST   /_sim/settings            {"interruptible"?: bool}  (spot: off, as RunPod since 2026-09)
    POST   /_sim/images              {"image", "pull"?: ok|missing|too_large, "entrypoint"?, "cmd"?}
    POST   /_sim/account             {"balance"}: at or below 0 RunPod stops every pod
                                      ("Exited by RunPod: Insufficient balance") and refuses launches
    GET    /_sim/pods                every pod ever (terminated ones too) and the volumes
    POST   /_sim/capacity            {"count", "data_center"?, "gpu_type"?, "cloud_type"?}
    POST   /_sim/prices              {"gpu_type", "secure"?, "community"?, "secure_spot"?, ...}
    GET|POST|DELETE /_sim/faults     {"kind": 500|429|graphql|timeout, "count"? | "rate"?,
                                      "seconds"?, "message"?, "echo"?}; {"clear": true} or DELETE
    GET|POST|DELETE /_sim/latency    {"operation": "gpuTypes"|...|"*", "seconds"}; DELETE
                                      clears one ({"operation"} or ?operation=) or all
    GET    /_sim/ledger              per-second charges (the billing rule is in world.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    OperationDefinitionNode,
    graphql,
    parse,
    validate,
)

from simulators.runpod import rest, views
from simulators.runpod.catalog import CLOUD_TYPES, cuda_tuple, load_catalog
from simulators.runpod.schema import schema
from simulators.runpod.world import DeployRequest, Image, SimError, World
from simulators.runtime import Runtime

FAULT_KINDS = ("500", "429", "graphql", "timeout")
GRAPHQL_FAULT_MESSAGE = "Something went wrong. Please try again later or contact support."


@dataclass
class Fault:
    kind: str
    count: int | None = None  # the next `count` calls
    rate: float | None = None  # or a random fraction of calls
    seconds: float = 40.0  # how long a "timeout" hangs (longer than the SDK's 30 s)
    message: str = GRAPHQL_FAULT_MESSAGE  # what a "graphql" fault says
    echo: bool = False  # the answer repeats the request's URL and Authorization header


class RunPodSimulator:
    """RunPod's GraphQL API on loopback, with pods run as local processes.

    `await sim.start()` returns the base URL to put in RUNPOD_API_BASE_URL; `await sim.stop()`
    kills every pod process."""

    def __init__(
        self,
        state_dir: Path,
        catalog_path: Path | None = None,
        api_key: str | None = None,
        start_delay: float = 1.0,
        notice_seconds: float = 5.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.api_key = api_key or f"rpa_{secrets.token_hex(16).upper()}"
        self.runtime = Runtime(self.state_dir)
        self.world = World(load_catalog(catalog_path), self.runtime, start_delay, notice_seconds)
        self.faults: list[Fault] = []
        self.latency: dict[str, float] = {}  # root field name or "*" -> seconds
        self.executed: list[str] = []  # root field names of every operation carried out
        self.calls = 0  # /graphql requests seen (including refused ones)
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.app.add_routes([
            web.post("/graphql", self._graphql),
            web.route("*", "/v2/{tail:.*}", self._rest),
            web.post("/_sim/settings", self._admin_settings),
            web.post("/_sim/images", self._admin_images),
            web.post("/_sim/account", self._admin_account),
            web.post("/_sim/pods/{pod_id}/preempt", self._admin_preempt),
            web.get("/_sim/pods", self._admin_pods),
            web.post("/_sim/capacity", self._admin_capacity),
            web.post("/_sim/prices", self._admin_prices),
            web.post("/_sim/faults", self._admin_faults),
            web.get("/_sim/faults", self._admin_faults),
            web.delete("/_sim/faults", self._admin_faults),
            web.post("/_sim/latency", self._admin_latency),
            web.get("/_sim/latency", self._admin_latency),
            web.delete("/_sim/latency", self._admin_latency),
            web.get("/_sim/ledger", self._admin_ledger),
        ])
        self._runner: web.AppRunner | None = None
        self._delayed: set[asyncio.Task[Any]] = set()
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        for task in list(self._delayed):
            task.cancel()
        await self.world.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ /graphql

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        given = given or request.query.get("api_key", "")
        return bool(given) and secrets.compare_digest(given.encode(), self.api_key.encode())

    def _next_fault(self) -> Fault | None:
        for fault in list(self.faults):
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
            if fault.rate is not None and random.random() < fault.rate:
                return fault
        return None

    async def _graphql(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if not self._authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        fault = self._next_fault()
        if fault is not None:
            echo = ""
            if fault.echo:
                echo = (f" (request: POST {request.url}, "
                        f"Authorization: {request.headers.get('Authorization', '')})")
            if fault.kind == "500":
                return web.Response(status=500, text="Internal Server Error" + echo)
            if fault.kind == "429":
                return web.Response(status=429, text="Too Many Requests" + echo)
            if fault.kind == "graphql":
                return web.json_response({"errors": [{"message": fault.message + echo}]})
            await asyncio.sleep(fault.seconds)
            return web.Response(status=504, text="Gateway Timeout" + echo)
        try:
            body = await request.json()
            query = body["query"]
            variables = body.get("variables") or None
            operation = body.get("operationName") or None
            if not isinstance(query, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"errors": [{"message": "Must provide a query string."}]}, status=400
            )
        try:
            document = parse(query)
        except GraphQLError as exc:
            return web.json_response({"errors": [exc.formatted]}, status=400)
        problems = validate(schema(), document)
        if problems:
            return web.json_response({"errors": [e.formatted for e in problems]}, status=400)
        fields = root_fields(document, operation)
        delay = max([self.latency.get(f, 0.0) for f in [*fields, "*"]])

        async def execute() -> Any:
            if delay > 0:
                await asyncio.sleep(delay)
            self.executed.extend(fields)
            return await graphql(
                schema(), query, root_value=self._root(document), variable_values=variables,
                operation_name=operation,
            )

        # the operation is carried out to its end even if the client gives up meanwhile
        task = asyncio.get_running_loop().create_task(execute())
        self._delayed.add(task)
        task.add_done_callback(self._delayed.discard)
        result = await asyncio.shield(task)
        out: dict[str, Any] = {"data": result.data}
        if result.errors:
            out["errors"] = [e.formatted for e in result.errors]
        return web.json_response(out)

    # ------------------------------------------------------------------ /v2 (REST)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if not self._authorized(request):
            return rest.problem(401, "The API key is missing or invalid.", "unauthorized")
        fault = self._next_fault()
        if fault is not None:
            echo = ""
            if fault.echo:
                echo = (f" (request: {request.method} {request.url}, "
                        f"Authorization: {request.headers.get('Authorization', '')})")
            if fault.kind == "500":
                return rest.problem(500, "Internal server error." + echo)
            if fault.kind == "429":
                return rest.rate_limited(1, "Too many requests." + echo)
            if fault.kind == "graphql":
                status = 500 if "went wrong" in fault.message.lower() else 400
                return rest.problem(status, fault.message + echo)
            await asyncio.sleep(fault.seconds)
            return rest.problem(504, "Gateway timeout." + echo)
        body: Any = None
        if request.can_read_body:
            try:
                body = json.loads(await request.read() or b"null")
            except ValueError:
                return rest.problem(400, "The body must be JSON.", "invalid-body")
        op = rest.operation(request.method, request.path)
        delay = max(self.latency.get(op, 0.0), self.latency.get("*", 0.0))
        method, path, query = request.method, request.path, dict(request.query)

        async def execute() -> web.Response:
            if delay > 0:
                await asyncio.sleep(delay)
            self.executed.append(op)
            try:
                status, out = rest.run(self.world, method, path, query, body)
            except rest.BadRequest as exc:
                return rest.problem(400, str(exc), "invalid-request")
            except SimError as exc:
                return rest.problem(exc.status, str(exc))
            except web.HTTPNotFound:
                return rest.problem(404, f"No such resource: {method} {path}", "not-found")
            if out is None:
                return web.Response(status=status)
            return web.json_response(out, status=status)

        task = asyncio.get_running_loop().create_task(execute())
        self._delayed.add(task)
        task.add_done_callback(self._delayed.discard)
        return await asyncio.shield(task)

    def _root(self, document: Any) -> dict[str, Any]:
        w = self.world

        def guard(fn: Any) -> Any:
            def run(_info: Any, **kwargs: Any) -> Any:
                try:
                    return fn(**kwargs)
                except SimError as exc:
                    raise GraphQLError(str(exc)) from None
            return run

        def gpu_types(input: dict[str, Any] | None = None) -> list[dict[str, Any]]:
            ids = None
            if input and (input.get("id") or input.get("ids")):
                ids = {input["id"]} if input.get("id") else set(input["ids"])
            return [views.gpu_type_view(w, g) for g in w.catalog.gpu_types.values() if ids is None or g.id in ids]

        def myself() -> dict[str, Any]:
            return {
                "id": "user_sim",
                "pubKey": "",
                "email": "sim@example.invalid",
                "clientBalance": w.settings.balance,
                "currentSpendPerHr": round(
                    sum(p.cost_per_hr for p in w.pods.values() if p.desired == "RUNNING"), 6
                ),
                "pods": lambda _info: [views.pod_view(w, p) for p in w.pods.values()],
                "networkVolumes": lambda _info: [v.view() for v in w.volumes.values()],
            }

        def pod(input: dict[str, Any]) -> dict[str, Any] | None:
            found = w.pods.get(input["podId"])
            return views.pod_view(w, found) if found else None

        def deploy(input: dict[str, Any] | None = None) -> dict[str, Any]:
            return views.pod_view(w, w.deploy(graphql_deploy(input or {}, interruptible=False)))

        def rent(input: dict[str, Any]) -> dict[str, Any]:
            return views.pod_view(w, w.deploy(graphql_deploy(input, interruptible=True)))

        def stop(input: dict[str, Any]) -> dict[str, Any]:
            return views.pod_view(w, w.stop(input["podId"]))

        def resume(input: dict[str, Any]) -> dict[str, Any]:
            return views.pod_view(w, w.resume(input["podId"], input.get("gpuCount")))

        def bid_resume(input: dict[str, Any]) -> dict[str, Any]:
            return views.pod_view(w, w.resume(input["podId"], input.get("gpuCount"), float(input["bidPerGpu"])))

        def terminate(input: dict[str, Any]) -> None:
            w.terminate(input["podId"])

        def create_volume(input: dict[str, Any]) -> dict[str, Any]:
            return w.create_volume(input["name"], input["size"], input["dataCenterId"]).view()

        def delete_volume(input: dict[str, Any]) -> None:
            w.delete_volume(input["id"])

        def user_settings(input: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"id": "user_sim", "pubKey": (input or {}).get("pubKey") or ""}

        return {
            "gpuTypes": guard(gpu_types),
            "dataCenters": guard(lambda: [views.data_center_view(w, d) for d in w.catalog.data_centers]),
            "myself": guard(myself),
            "pod": guard(pod),
            "podFindAndDeployOnDemand": guard(deploy),
            "podRentInterruptable": guard(rent),
            "podStop": guard(stop),
            "podResume": guard(resume),
            "podBidResume": guard(bid_resume),
            "podTerminate": guard(terminate),
            "createNetworkVolume": guard(create_volume),
            "deleteNetworkVolume": guard(delete_volume),
            "updateUserSettings": guard(user_settings),
        }

    # ------------------------------------------------------------------ /_sim admin

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except (ValueError, json.JSONDecodeError):
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return data

    async def _admin_preempt(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        pod_id = request.match_info["pod_id"]
        pod = self.world.pods.get(pod_id)
        if pod is None or pod.desired != "RUNNING" or pod.preempting:
            return web.json_response({"error": f"pod {pod_id} is not running"}, status=409)
        notice = body.get("notice_seconds")
        causes: dict[str, str | None] = {"": None, "outbid": "Outbid", "host": "Machine offline",
                                         "runpod": "Exited by Runpod"}
        if str(body.get("cause") or "") not in causes:
            raise web.HTTPBadRequest(text="cause must be host (the host went away), outbid or runpod")
        cause = causes[str(body.get("cause") or "")]
        coro = self.world.preempt(pod_id, None if notice is None else float(notice), cause)
        if body.get("wait"):
            await coro
        else:
            self.world._spawn(coro)
        return web.json_response({"ok": True, "pod": views.admin_view(self.world, pod)})

    async def _admin_settings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if "interruptible" in body:
            self.world.settings.interruptible = bool(body["interruptible"])
        return web.json_response({"ok": True, "interruptible": self.world.settings.interruptible})

    async def _admin_images(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("image")
        pull = str(body.get("pull", "ok"))
        if not isinstance(name, str) or not name or pull not in ("ok", "missing", "too_large"):
            raise web.HTTPBadRequest(text="image (a name) is required; pull is ok, missing or too_large")
        self.world.settings.images[name] = Image(
            entrypoint=list(body.get("entrypoint") or []), cmd=list(body.get("cmd") or []), pull=pull)
        return web.json_response({"ok": True})

    async def _admin_account(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            balance = float(body["balance"])
        except (KeyError, TypeError, ValueError):
            raise web.HTTPBadRequest(text="balance (a number) is required") from None
        return web.json_response({"ok": True, "stopped": self.world.set_balance(balance)})

    async def _admin_pods(self, _request: web.Request) -> web.Response:
        w = self.world
        pods = [views.admin_view(w, p) for p in w.pods.values()]
        pods += [views.admin_view(w, p, terminated=True) for p in w.gone.values()]
        volumes = [v.view() for v in w.volumes.values()]
        return web.json_response({"pods": pods, "volumes": volumes})

    async def _admin_capacity(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        cloud = body.get("cloud_type")
        cloud = cloud.upper() if isinstance(cloud, str) else None
        if cloud is not None and cloud not in CLOUD_TYPES:
            raise web.HTTPBadRequest(text="cloud_type must be secure or community")
        try:
            count = int(body["count"])
        except (KeyError, TypeError, ValueError):
            raise web.HTTPBadRequest(text="count (an integer) is required") from None
        n = self.world.catalog.set_capacity(
            count, dc=body.get("data_center"), gpu=body.get("gpu_type"), cloud=cloud
        )
        return web.json_response({"ok": True, "set": n})

    async def _admin_prices(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        gpu = self.world.catalog.gpu_types.get(body.get("gpu_type", ""))
        if gpu is None:
            raise web.HTTPNotFound(text="unknown gpu_type")
        keys = {"secure": "SECURE", "community": "COMMUNITY",
                "secure_spot": "SECURE_SPOT", "community_spot": "COMMUNITY_SPOT"}
        for key, kind in keys.items():
            if key in body:
                if body[key] is None:
                    gpu.prices.pop(kind, None)
                else:
                    gpu.prices[kind] = float(body[key])
        return web.json_response({"ok": True, "prices": gpu.prices})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"ok": True, "faults": [f.__dict__ for f in self.faults]})
        body = await self._body(request)
        if body.get("clear") or request.method == "DELETE":
            self.faults.clear()
            return web.json_response({"ok": True, "faults": []})
        kind = str(body.get("kind", ""))
        if kind not in FAULT_KINDS:
            raise web.HTTPBadRequest(text=f"kind must be one of {', '.join(FAULT_KINDS)}")
        fault = Fault(
            kind,
            seconds=float(body.get("seconds", 40.0)),
            message=str(body.get("message") or GRAPHQL_FAULT_MESSAGE),
            echo=bool(body.get("echo")),
        )
        if body.get("rate") is not None:
            fault.rate = max(0.0, min(1.0, float(body["rate"])))
        else:
            fault.count = max(1, int(body.get("count", 1)))
        self.faults.append(fault)
        return web.json_response({"ok": True, "faults": [f.__dict__ for f in self.faults]})

    async def _admin_latency(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            body = await self._body(request)
            op = body.get("operation", request.query.get("operation"))
            if request.method == "DELETE":
                if op is None:
                    self.latency.clear()
                else:
                    self.latency.pop(str(op), None)
            else:
                if not isinstance(op, str) or not op:
                    raise web.HTTPBadRequest(text='operation (a root field name or "*") is required')
                try:
                    seconds = float(body["seconds"])
                except (KeyError, TypeError, ValueError):
                    raise web.HTTPBadRequest(text="seconds (a number) is required") from None
                if not 0 <= seconds <= 3600:
                    raise web.HTTPBadRequest(text="seconds must be between 0 and 3600")
                self.latency[op] = seconds
        return web.json_response({"ok": True, "latency": self.latency})

    async def _admin_ledger(self, _request: web.Request) -> web.Response:
        return web.json_response(self.runtime.ledger.as_json())


def graphql_deploy(inp: dict[str, Any], interruptible: bool) -> DeployRequest:
    """podFindAndDeployOnDemand / podRentInterruptable input -> the world's DeployRequest. The
    CUDA filter is minCudaVersion (what dstack sends) or the oldest of allowedCudaVersions."""
    ids = [inp["gpuTypeId"]] if inp.get("gpuTypeId") else list(inp.get("gpuTypeIdList") or [])
    cudas = [v for v in inp.get("allowedCudaVersions") or [] if isinstance(v, str)]
    min_cuda = inp.get("minCudaVersion") or (min(cudas, key=cuda_tuple) if cudas else None)
    return DeployRequest(
        name=inp.get("name") or "",
        image=inp.get("imageName") or "",
        gpu_type_ids=ids,
        gpu_count=int(inp.get("gpuCount") or 1),
        cloud=inp.get("cloudType") or "ALL",
        data_centers=[inp["dataCenterId"]] if inp.get("dataCenterId") else None,
        countries=[inp["countryCode"]] if inp.get("countryCode") else None,
        network_volume=inp.get("networkVolumeId") or None,
        mount_path=inp.get("volumeMountPath") or "/workspace",
        container_disk_gb=int(inp.get("containerDiskInGb") or 10),
        volume_gb=int(inp.get("volumeInGb") or 0),
        env=[(e["key"], e.get("value") or "") for e in (inp.get("env") or [])],
        docker_args=inp.get("dockerArgs") or "",
        min_cuda=min_cuda,
        interruptible=interruptible,
        bid=inp.get("bidPerGpu"),
    )


def root_fields(document: DocumentNode, operation: str | None) -> list[str]:
    """The root field names (not aliases) of the operation a request runs."""
    ops = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if operation:
        ops = [d for d in ops if d.name is not None and d.name.value == operation]
    return [s.name.value for d in ops[:1] for s in d.selection_set.selections if isinstance(s, FieldNode)]


def main(
    port: int,
    catalog: Path | None,
    api_key: str | None,
    state_dir: Path | None,
    notice_seconds: float,
    start_delay: float,
) -> None:
    """Run the simulator until SIGINT/SIGTERM (the `gpuhop sim runpod` command)."""

    async def serve() -> None:
        with contextlib.ExitStack() as stack:
            root = state_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuhop-runpod-")))
            sim = RunPodSimulator(root, catalog, api_key, start_delay, notice_seconds)
            url = await sim.start(port=port)
            print(f"RunPod simulator at {url}  (RUNPOD_API_BASE_URL={url})", flush=True)
            print(f"API key: {sim.api_key}", flush=True)
            print(f"state: {root}", flush=True)
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, done.set)
            try:
                await done.wait()
            finally:
                await sim.stop()

    asyncio.run(serve())
