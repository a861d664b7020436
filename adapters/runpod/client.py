"""The HTTP under both RunPod transports (REST v2 in rest.py, GraphQL in graphql.py): one aiohttp
session per adapter, real timeouts, a retry budget, and the key kept out of every message.

Why not the `runpod` SDK: it is synchronous (`requests`), so it could only run in a thread, and a
thread cannot be cancelled. A create that timed out in `asyncio.wait_for` kept running in its
abandoned thread and still made its pod, next to the one the retry made. Here every request is an
aiohttp request with a real `ClientTimeout`, so when a call gives up nothing of it is left running.

Timeouts follow RunPod's: the SDK allows 30 s per request and its create_pod makes two requests,
so one request gets `request_timeout_seconds` (20 s) and one call with its retries, such as a
launch (a lookup, then the create), gets `retry_budget_seconds` (45 s) in all; every request in
it gets at most what is left of that budget, so no call outlives its caller's budget.

`send` maps transport failures (timeouts, connection errors) to RetryLater; each transport maps
its answers (GraphQL errors, REST problem+json) with the shared message classes below. The API
key (and any bearer token or api_key parameter an error page echoes) is scrubbed from every message.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

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

from adapters.base import AuthError, PermanentError, RetryLater
from adapters.runpod.settings import RunPodSettings

log = logging.getLogger("gpuhop.adapters.runpod")
T = TypeVar("T")
PROVIDER = "runpod"

NO_CAPACITY = re.compile(
    r"no longer any instances available|not enough free gpus|no instances? available"
    r"|below the minimum bid|bid price is (too )?low",
    re.IGNORECASE,
)
TRANSIENT = re.compile(
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

    @property
    def open(self) -> bool:
        return self._session is not None and not self._session.closed

    async def send(self, what: str, method: str, url: str, body: str | None = None,
                   params: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        """One HTTP request within what is left of the budget: (status, Retry-After, body).
        Timeouts and connection errors -> RetryLater."""
        timeout = self._timeout(what)
        try:
            async with self._http().request(
                method, url, data=body, params=params,
                timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
            ) as resp:
                return resp.status, resp.headers.get("Retry-After", ""), await resp.read()
        except TimeoutError:
            raise RetryLater(f"RunPod {what}: no answer within {timeout:.3g} s",
                             provider=PROVIDER) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryLater(f"RunPod {what}: {type(exc).__name__}: {self.scrub(str(exc))}",
                             provider=PROVIDER) from None

    @staticmethod
    def delay(retry_after: str) -> float:
        return min(float(retry_after), 60.0) if retry_after.isdigit() else 5.0

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

