"""The web dashboard: a few static files (orchestrator/web) served at `/` with no build step and
no dependency. The page holds no data of its own: after the user gives the API token (typed in,
or handed over in the URL's #fragment by `gpuhop dashboard`, which never reaches a server), its
script calls the same /v1 API as the CLI with that token. So the files are public, and every
byte of job data still passes the API's bearer check.

Strict headers keep a hostile job name or log line inert: the script writes text, never HTML,
and the Content-Security-Policy allows only the daemon's own script and style (no inline code,
no other origin), no framing, no referrer carrying the page's address."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PATHS = {"/", *(f"/ui/{name}" for name in ASSETS)}  # public: the auth middleware lets these through


def _asset(name: str) -> bytes:
    return resources.files("orchestrator.web").joinpath(name).read_bytes()


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8", headers=HEADERS)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    if name not in ASSETS:
        raise web.HTTPNotFound(text=f"no dashboard file {name[:40]!r}")
    return web.Response(body=_asset(name), content_type=ASSETS[name], charset="utf-8", headers=HEADERS)


def setup(app: web.Application) -> None:
    app.router.add_get("/", index, allow_head=False)
    app.router.add_get("/ui/{asset}", asset, allow_head=False)
