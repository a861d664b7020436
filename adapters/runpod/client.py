"""The one door to RunPod: the GraphQL the `runpod` SDK speaks, sent with native async HTTP.

Why not the SDK itself: it is synchronous (`requests`), so it could only run in a thread, and a
thread cannot be cancelled. A create that timed out in `asyncio.wait_for` kept running in its
abandoned thread and still made its pod, next to the one the retry made. Here every request is an
aiohttp request on the adapter's own session with a real `ClientTimeout`, so when a call gives up
nothing of it is left running. The wire format stays the SDK's: `POST {api_url}/graphql`, body
`{"query": ...}`, `Authorization: Bearer <key>` and the SDK's User-Agent, and the mutation texts
come from the SDK's own generators where it has them (see adapter.py), every string escaped with
`gql_string`.

Every failure becomes one of adapters.base's errors: the no-capacity message -> NoCapacity, HTTP
401 -> AuthError, throttling / 5xx / timeouts / connection errors -> RetryLater (retried here with
backoff, inside a bounded budget that also bounds each request's timeout), other GraphQL errors ->
PermanentError. The API key (and any bearer token or api_key parameter an error page echoes) is
scrubbed from every message. The surface is small on purpose, `query(what, text)` and
`retrying(what, attempt)`, so that RunPod's REST API can replace GraphQL behind it later.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from runpod.user_agent import USER_AGENT
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from adapters.base import AuthError, NoCapacity, PermanentError, RetryLater
from adapters.runpod.settings import RunPodSettings

log = logging.getLogger("gpuhop.adapters.runpod")
T = TypeVar("T")
PROVIDER = "runpod"

_NO_CAPACITY = re.compile(
    r"no longer any instances available|not enough free gpus|no instances? available"
    r"|below the minimum bid|bid price is (too )?low",
    re.IGNORECASE,
)
_TRANSIENT = re.compile(
    r"something went wrong|internal server error|too many requests|rate limit|timed? ?out"
    r"|temporarily unavailable",
    re.IGNORECASE,
)
_NOT_FOUND = re.compile(r"not found|does not exist|no pod with", re.IGNORECASE)
_ECHOED_SECRETS = re.compile(r"(bearer\s+|api[_-]?key[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;}]+", re.IGNORECASE)

# the end of the current retry budget (monotonic seconds), so no request outlives it
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("runpod_deadline", default=None)


def gql_string(value: str) -> str:
    """Escape `value` for the inside of a GraphQL "..." string: the SDK pastes strings into the
    query text, so a quote, backslash or newline must never end the string or add syntax."""
    out: list[str] = []
    for ch in str(value):
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F or ch in "\u2028\u2029":
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise PermanentError("text holds an unpaired UTF-16 surrogate", provider=PROVIDER)
        else:
            out.append(ch)
    return "".join(out)


def is_not_found(exc: Exception) -> bool:
    """A GraphQL error saying the pod or volume does not exist (any more)."""
    return isinstance(exc, PermanentError) and not isinstance(exc, AuthError) and bool(
        _NOT_FOUND.search(str(exc))
    )


class RunPodClient:
    def __init__(self, settings: RunPodSettings) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        key = key or os.environ.get("RUNPOD_API_KEY", "")
        if not key:
            raise AuthError(
                "no RunPod API key: set api_key in [providers.runpod] or the RUNPOD_API_KEY "
                "environment variable",
                provider=PROVIDER,
            )
        self._key = key
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the key
        return f"RunPodClient(api_url={self.settings.api_url!r})"

    # ------------------------------------------------------------------ lifecycle

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": USER_AGENT,
                    "Authorization": f"Bearer {self._key}",
                },
                connector=aiohttp.TCPConnector(limit=16),
            )
        return self._session

    async def start(self) -> None:
        self._http()

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # ------------------------------------------------------------------ calls

    def scrub(self, text: str) -> str:
        text = text.replace(self._key, "***")
        text = _ECHOED_SECRETS.sub(lambda m: m.group(1) + "***", text)
        return text[:500]

    def _timeout(self, what: str) -> float:
        timeout = self.settings.request_timeout_seconds
        deadline = _deadline.get()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0.01:
                raise RetryLater(f"RunPod {what}: out of retry budget", provider=PROVIDER)
            timeout = min(timeout, left)
        return timeout

    async def query(self, what: str, text: str) -> dict[str, Any]:
        """Run GraphQL `text` once, as the SDK would send it; returns its `data` object."""
        timeout = self._timeout(what)
        url = f"{self.settings.api_url}/graphql"
        try:
            async with self._http().post(
                url, data=json.dumps({"query": text}),
                timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
            ) as resp:
                status = resp.status
                raw = await resp.read()
                retry_after = resp.headers.get("Retry-After", "")
        except TimeoutError:
            raise RetryLater(f"RunPod {what}: no answer within {timeout:.3g} s",
                             provider=PROVIDER) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryLater(f"RunPod {what}: {type(exc).__name__}: {self.scrub(str(exc))}",
                             provider=PROVIDER) from None
        return self._answer(what, status, raw, retry_after)

    def _answer(self, what: str, status: int, raw: bytes, retry_after: str) -> dict[str, Any]:
        """Map one HTTP answer to its data or to an adapter error (pure, apart from the key)."""
        if status == 401:
            raise AuthError(f"RunPod {what}: the API key was refused (HTTP 401)", provider=PROVIDER)
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if status == 429 or status >= 500 or not isinstance(body, dict):
            delay = float(retry_after) if retry_after.isdigit() else 5.0
            snippet = " ".join(text.split())[:200]
            raise RetryLater(f"RunPod {what}: HTTP {status} {self.scrub(snippet)}".rstrip(),
                             provider=PROVIDER, delay=min(delay, 60.0))
        errors = body.get("errors")
        if errors:
            first = errors[0] if isinstance(errors, list) and errors else {}
            message = self.scrub(str(first.get("message") if isinstance(first, dict) else first))
            if _NO_CAPACITY.search(message):
                raise NoCapacity(f"RunPod {what}: {message}", provider=PROVIDER)
            if _TRANSIENT.search(message):
                raise RetryLater(f"RunPod {what}: {message}", provider=PROVIDER)
            raise PermanentError(f"RunPod {what}: {message}", provider=PROVIDER)
        if status >= 400:
            raise PermanentError(f"RunPod {what}: HTTP {status}", provider=PROVIDER)
        data = body.get("data")
        if not isinstance(data, dict):
            raise RetryLater(f"RunPod {what}: response without data", provider=PROVIDER)
        return data

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it does not raise RetryLater, a few times, within the budget.
        Every request inside it gets at most what is left of the budget as its timeout, so the
        whole call ends within the budget without cancelling anything from outside."""
        s = self.settings
        deadline = time.monotonic() + s.retry_budget_seconds
        backoff = wait_exponential(multiplier=s.retry_base_delay_seconds, max=4)

        def wait(rs: RetryCallState) -> float:  # never sleep past the budget
            return max(0.0, min(backoff(rs), deadline - time.monotonic()))

        token = _deadline.set(deadline)
        try:
            async for state in AsyncRetrying(
                retry=retry_if_exception_type(RetryLater),
                stop=stop_after_attempt(s.retry_attempts) | stop_after_delay(s.retry_budget_seconds),
                wait=wait,
                reraise=True,
                before_sleep=lambda rs: log.info(
                    "RunPod %s: retrying after %s", what,
                    rs.outcome.exception() if rs.outcome else "?",
                ),
            ):
                with state:
                    return await attempt()
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            _deadline.reset(token)

