"""The aiohttp application: authentication, JSON errors and request metrics around the routes.

Handlers stay thin: they parse and authorize, change desired state in the store, and wake the
engine; the engine does the provider work. Every caller mistake is a 4xx with a JSON message
that says what was wrong; nothing a client sends can produce a 500 or reach a provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from orchestrator import auth, metrics
from orchestrator.api import dashboard
from orchestrator.api.body import MAX_BODY
from orchestrator.api.follow import Followers
from orchestrator.engine import Engine
from orchestrator.objectstore import ObjectStore
from orchestrator.store import Store
from orchestrator.store.submits import SubmitQueue

log = logging.getLogger("gpuhop.api")

CLIENT_CLOSED = 499  # nginx's code for "the client went away first": not a server error
DEFAULT_MAX_FOLLOWERS = 32


@dataclass
class ApiContext:
    store: Store
    engine: Engine
    token: str
    agent_key: bytes
    logs_dir: Path
    max_followers_per_token: int = DEFAULT_MAX_FOLLOWERS  # concurrent logs?follow=true streams
    objects: ObjectStore | None = None  # [storage]: checkpoint sync of volumes (None: not configured)
    followers: Followers = field(default_factory=Followers)
    submits: SubmitQueue = field(init=False)

    def __post_init__(self) -> None:
        self.followers.max_per_token = self.max_followers_per_token
        self.submits = SubmitQueue(self.store)


CTX = web.AppKey("ctx", ApiContext)
PUBLIC_PATHS = {"/healthz", *dashboard.PATHS}  # the dashboard's files hold no data
# authenticated per attempt, in the handler
AGENT_PATHS = {"/v1/agent/report", "/v1/agent/sync/restore", "/v1/agent/sync/upload", "/v1/agent/sync/commit",
               "/v1/agent/workdir"}


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
          **extra: object) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}, **extra}, status=status,
                             headers=headers)


def bearer(request: web.Request) -> str | None:
    """The bearer token of the request, or None. A header that is not plain ASCII (aiohttp hands
    non-UTF-8 bytes over as surrogates) is no token: it is refused, never compared."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not token.isascii() or not token.isprintable():
        return None
    return token


# headers an error keeps from aiohttp's own exception (405 must say which methods are allowed)
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    route = resource.canonical if resource else "unmatched"
    status = 500
    began = time.perf_counter()
    try:
        if request.path not in PUBLIC_PATHS and request.path not in AGENT_PATHS:
            token = bearer(request)
            if token is None or not auth.same_secret(request.app[CTX].token, token):
                resp: web.StreamResponse = error(
                    401, "unauthorized",
                    "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                    "(the daemon's token is in <state_dir>/token, or set GPUHOP_TOKEN)",
                    headers={"WWW-Authenticate": "Bearer"},
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
            kept = {h: exc.headers[h] for h in _KEPT_HEADERS if h in exc.headers}
            return error(exc.status, exc.reason.lower().replace(" ", "_"), message or exc.reason, headers=kept)
        raise
    except ConnectionError:
        # the client went away (Ctrl-C on `gpuhop logs -f`): nothing to answer, nothing to log
        status = CLIENT_CLOSED
        return web.Response(status=CLIENT_CLOSED)
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, route)
        return error(500, "internal", "internal error; see the daemon's log")
    finally:
        metrics.API_REQUESTS.labels(request.method, route, str(status)).inc()
        metrics.API_SECONDS.labels(request.method, route).observe(time.perf_counter() - began)


def make_app(ctx: ApiContext) -> web.Application:
    from orchestrator.api import agent_routes, routes, sync_routes, volumes, workdir_routes

    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[CTX] = ctx

    async def close_followers(app: web.Application) -> None:
        await app[CTX].followers.close()

    async def close_objects(app: web.Application) -> None:
        if app[CTX].objects is not None:
            app[CTX].objects.close()  # type: ignore[union-attr]

    app.on_shutdown.append(close_followers)
    app.on_cleanup.append(close_objects)
    routes.setup(app)
    agent_routes.setup(app)
    sync_routes.setup(app)
    volumes.setup(app)
    workdir_routes.setup(app)
    dashboard.setup(app)
    return app
