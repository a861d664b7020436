"""The simulator's own admin API under `/_sim/` (not AWS's): the levers a test or the demo pulls
to make the simulated cloud misbehave (interrupt a spot instance, run out of capacity, move
prices, fail calls) and the windows it looks through (instances, ledger, catalogue).

    GET    /_sim/instances                      every instance the simulator launched
    POST   /_sim/instances/{id}/interrupt       {"notice_seconds"?: s, "action"?: "terminate"|"stop"}
    POST   /_sim/instances/{id}/backdate        {"seconds": s}: as if it had entered running s earlier
                                                (LaunchTime and the ledger alike: a test bills past EC2's
                                                60 s minimum without waiting a minute)
    GET    /_sim/ledger                         what instances (EC2's rule: billing.py) and volumes cost
    GET    /_sim/catalog                        prices and capacity per (type, zone)
    POST   /_sim/capacity                       {"zone", "capacity", "instance_type"?, "market"?}
    POST   /_sim/prices                         {"instance_type", "zone", "spot_price"} or
                                                {"instance_type", "region", "on_demand_price"}
    POST   /_sim/instances/{id}/rebalance       a rebalance recommendation (EventBridge + IMDS)
    POST   /_sim/quota                          {"region", "market", "family"?: "G"|"P", "vcpus": n | null}
                                                (Service Quotas reports it; no family = both)
    POST   /_sim/launch_failures                {"code": "Server.InsufficientInstanceCapacity" |
                                                 "Server.InternalError", "count"?, "instance_type"?, "zone"?}
    POST   /_sim/policy                         {"require_imdsv2"?: bool, "default_vpc"?: false}
    GET|POST|DELETE /_sim/faults                {"code", "count"?, "rate"?, "actions"?, "delay"?,
                                                 "services"?, "message"?, "echo_credentials"?}
    PUT    /_sim/metadata/{id}/latest/api/token the IMDSv2 session token (TTL header required)
    GET    /_sim/metadata/{id}/latest/meta-data/...   the instance metadata service (IMDS)
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from simulators.aws.ec2 import Ec2Front
from simulators.aws.fleet import LAUNCH_FAILURES, Fleet


def routes(fleet: Fleet, ec2: Ec2Front) -> list[web.RouteDef]:
    catalog = fleet.catalog

    async def body_of(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text="body must be JSON") from exc
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return data

    def bad(exc: Exception) -> web.Response:
        return web.json_response({"error": str(exc)}, status=400)

    async def instances(_: web.Request) -> web.Response:
        rows = [rec.as_json(fleet.runtime) for rec in fleet.instances.values()]
        return web.json_response({"instances": rows})

    async def interrupt(request: web.Request) -> web.Response:
        data = await body_of(request)
        instance_id = request.match_info["instance_id"]
        if instance_id not in fleet.instances:
            return web.json_response({"error": f"unknown instance {instance_id}"}, status=404)
        action = str(data.get("action", "terminate"))
        if action not in ("terminate", "stop", "hibernate"):
            return bad(ValueError("action must be terminate, stop or hibernate"))
        notice = data.get("notice_seconds")
        try:
            result = fleet.interrupt(instance_id, None if notice is None else float(notice), action)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"instance_id": instance_id, "notice": result})

    async def backdate(request: web.Request) -> web.Response:
        data = await body_of(request)
        instance_id = request.match_info["instance_id"]
        if instance_id not in fleet.instances:
            return web.json_response({"error": f"unknown instance {instance_id}"}, status=404)
        try:
            fleet.backdate(instance_id, int(data["seconds"]))
        except (KeyError, TypeError, ValueError) as exc:
            return bad(ValueError(f"backdate needs {{'seconds': n}} on a running instance: {exc}"))
        return web.json_response({"instance_id": instance_id})

    async def ledger(_: web.Request) -> web.Response:
        """Instances billed as EC2 does (fleet.py, billing.py); volumes per second."""
        now = time.time()
        volumes = [e for e in fleet.runtime.ledger.as_json()["entries"] if e["kind"] != "instance"]  # type: ignore[attr-defined]
        entries = fleet.ledger_rows(now) + volumes
        return web.json_response({"entries": entries, "total_usd": round(sum(e["cost_usd"] for e in entries), 6)})

    async def get_catalog(_: web.Request) -> web.Response:
        data = catalog.as_json()
        for row in data["offers"]:  # type: ignore[attr-defined]
            row["in_use"] = {
                m: fleet.in_use(row["instance_type"], row["zone"], m) for m in ("spot", "on-demand")
            }
        return web.json_response(data)

    async def capacity(request: web.Request) -> web.Response:
        data = await body_of(request)
        try:
            itype, market = data.get("instance_type"), data.get("market")
            catalog.set_capacity(
                None if itype is None else str(itype), str(data["zone"]), None if market is None else str(market),
                int(data["capacity"] if "capacity" in data else data["count"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            return bad(exc)
        return web.json_response({"ok": True})

    async def prices(request: web.Request) -> web.Response:
        data = await body_of(request)
        try:
            if "spot_price" in data:
                catalog.set_spot_price(str(data["instance_type"]), str(data["zone"]), float(data["spot_price"]))
            if "on_demand_price" in data:
                catalog.set_on_demand_price(
                    str(data["instance_type"]), str(data["region"]), float(data["on_demand_price"])
                )
        except (KeyError, ValueError, TypeError) as exc:
            return bad(exc)
        return web.json_response({"ok": True})

    async def quota(request: web.Request) -> web.Response:
        data = await body_of(request)
        try:
            market = str(data.get("market", "on-demand"))
            family = data.get("family")
            if market not in ("spot", "on-demand") or family not in (None, "G", "P"):
                raise ValueError("market: spot or on-demand; family: G or P")
            vcpus = data.get("vcpus")
            ec2.quotas.set(str(data["region"]), market, None if family is None else str(family), None if vcpus is None else int(vcpus))
        except (KeyError, ValueError, TypeError) as exc:
            return bad(exc)
        return web.json_response({"ok": True})

    async def rebalance(request: web.Request) -> web.Response:
        instance_id = request.match_info["instance_id"]
        if instance_id not in fleet.instances:
            return web.json_response({"error": f"unknown instance {instance_id}"}, status=404)
        try:
            result = fleet.recommend_rebalance(instance_id)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"instance_id": instance_id, "rebalance": result})

    async def launch_failures(request: web.Request) -> web.Response:
        data = await body_of(request)
        code = str(data.get("code", ""))
        if code not in LAUNCH_FAILURES:
            return bad(ValueError(f"code must be one of {sorted(LAUNCH_FAILURES)}"))
        try:
            rule = {"code": code, "count": int(data.get("count", 1))}
        except (ValueError, TypeError) as exc:
            return bad(exc)
        for key in ("instance_type", "zone"):
            if data.get(key) is not None:
                rule[key] = str(data[key])
        ec2.launch_failures.append(rule)
        return web.json_response({"launch_failures": ec2.launch_failures})

    async def policy(request: web.Request) -> web.Response:
        data = await body_of(request)
        if "require_imdsv2" in data:
            ec2.require_imdsv2 = bool(data["require_imdsv2"])
        if data.get("default_vpc") is False:
            for region in catalog.regions:
                fleet.remove_default_vpc(region)
        return web.json_response({"require_imdsv2": ec2.require_imdsv2})

    async def faults(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                rule = ec2.faults.add(await body_of(request))
            except (ValueError, TypeError) as exc:
                return bad(exc)
            return web.json_response(rule.as_json())
        if request.method == "DELETE":
            ec2.faults.clear()
        return web.json_response({"faults": [r.as_json() for r in ec2.faults.rules]})

    async def metadata(request: web.Request) -> web.Response:
        instance_id, path = request.match_info["instance_id"], request.match_info["path"]
        if request.method == "PUT":
            if path.strip("/") != "latest/api/token":
                return web.Response(status=405, text="Method Not Allowed")
            status, text = fleet.metadata_token(instance_id, request.headers.get("X-aws-ec2-metadata-token-ttl-seconds"))
        else:
            status, text = fleet.metadata(instance_id, path, request.headers.get("X-aws-ec2-metadata-token"))
        return web.Response(status=status, text=text)

    return [
        web.get("/_sim/instances", instances),
        web.post("/_sim/instances/{instance_id}/interrupt", interrupt),
        web.post("/_sim/instances/{instance_id}/backdate", backdate),
        web.get("/_sim/ledger", ledger),
        web.get("/_sim/catalog", get_catalog),
        web.post("/_sim/capacity", capacity),
        web.post("/_sim/prices", prices),
        web.post("/_sim/instances/{instance_id}/rebalance", rebalance),
        web.post("/_sim/quota", quota),
        web.post("/_sim/launch_failures", launch_failures),
        web.post("/_sim/policy", policy),
        web.route("*", "/_sim/faults", faults),
        web.get("/_sim/metadata/{instance_id}/{path:.*}", metadata),
        web.put("/_sim/metadata/{instance_id}/{path:.*}", metadata),
    ]
