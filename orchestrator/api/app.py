"""The aiohttp application: authentication, JSON errors and request metrics around the routes.

Handlers stay thin: they parse and authorize, change desired state in the store, and wake the
engine; the engine does the provider work. Every caller mistake is a 4xx with a JSON message
that says what was wrong; nothing a client sends can produce a 500 or reach a provider.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from orchestrator import auth, metrics
from orchestrator.engine import Engine
from orchestrator.store import Store

log = logging.getLogger("gpuhop.api")

MAX_BODY = 1024 * 1024


@dataclass
class ApiContext:
    store: Store
    engine: Engine
    token: str
    agent_key: bytes
    logs_dir: Path


CTX = web.AppKey("ctx", ApiContext)
PUBLIC_PATHS = {"/healthz"}
AGENT_PATHS = {"/v1/agent/report"}  # authenticated per attempt, in the handler


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        if request.path not in PUBLIC_PATHS and request.path not in AGENT_PATHS:
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not auth.same_secret(request.app[CTX].token, token.strip()):
                resp: web.StreamResponse = error(
                    401, "unauthorized",
                    "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                    "(the daemon's token is in <state_dir>/token, or set GPUHOP_TOKEN)",
                )
                status = resp.status
                return resp
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400:
            message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
            return error(exc.status, exc.reason.lower().replace(" ", "_"), message or exc.reason)
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, route)
        return error(500, "internal", "internal error; see the daemon's log")
    finally:
        metrics.API_REQUESTS.labels(request.method, route, str(status)).inc()


def make_app(ctx: ApiContext) -> web.Application:
    from orchestrator.api import agent_routes, routes

    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[CTX] = ctx
    routes.setup(app)
    agent_routes.setup(app)
    return app
