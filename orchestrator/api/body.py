"""Reading a request body as JSON without letting a hostile body reach a 500: a size cap read as
the bytes arrive, strict UTF-8, no NaN/Infinity, a bound on integer length and on nesting depth,
and validation messages that quote the caller's text only short and escaped.

Every failure here is an aiohttp HTTPException with a message; the middleware turns it into the
API's JSON error.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

MAX_BODY = 1024 * 1024
MAX_DEPTH = 32  # a job spec is 3 deep; nothing the API takes needs more


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def too_large(limit: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=limit + 1, text=f"request body is larger than {limit // 1024} KiB"
    )


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The body's bytes, refused with 413 as soon as it passes `limit` (before it is all read)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise too_large(limit)
    return bytes(buf)


def _depth_ok(value: Any, limit: int) -> bool:
    """Iterative (a deep body must not recurse here either)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return True


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise web.HTTPBadRequest(text=f"request body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise web.HTTPBadRequest(text=f"request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                                      f"column {exc.colno}") from None
    except ValueError as exc:
        # int() refuses a number of more than 4300 digits; NaN and Infinity are refused above
        what = "a number in it has too many digits" if "digits" in str(exc) else str(exc)[:200]
        raise web.HTTPBadRequest(text=f"request body is not acceptable JSON: {what}") from None
    if not _depth_ok(value, MAX_DEPTH):
        raise web.HTTPBadRequest(text=f"request body is nested too deeply (at most {MAX_DEPTH} levels)")
    return value


async def read_json(request: web.Request, limit: int = MAX_BODY) -> Any:
    return parse_json(await read_body(request, limit))


def _short(part: object, limit: int = 64) -> str:
    text = part if isinstance(part, str) else str(part)
    shown = text[:limit].encode("unicode_escape").decode("ascii")
    return shown + ("..." if len(text) > limit else "")


def validation_message(exc: ValidationError) -> str:
    """'field.path: what is wrong; ...' for the first errors, each part short and escaped."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:10]:
        where = ".".join(_short(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg[:300]}")
    return "; ".join(parts)
