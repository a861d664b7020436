"""The one door to RunPod: the synchronous `runpod` SDK, run in threads, with its errors mapped.

Every call goes through `asyncio.to_thread` (the SDK uses `requests`) under a timeout, and every
failure becomes one of adapters.base's errors: the no-capacity message -> NoCapacity, HTTP 401
-> AuthError, throttling / 5xx / timeouts / connection errors -> RetryLater (retried here with
backoff first, inside a bounded budget), other GraphQL errors -> PermanentError. The API key is
scrubbed from every message. `gql_string` escapes values for the SDK's inline query text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import requests
import runpod
from runpod.api.graphql import run_graphql_query
from runpod.error import AuthenticationError, QueryError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from adapters.base import AdapterError, AuthError, NoCapacity, PermanentError, RetryLater
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

    def __repr__(self) -> str:  # never show the key
        return f"RunPodClient(api_url={self.settings.api_url!r})"

    # ------------------------------------------------------------------ calls

    def _scrub(self, text: str) -> str:
        text = text.replace(self._key, "***")
        return text[:500]

    def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # the SDK reads its URL from the environment and create_pod uses the module-level key
        os.environ["RUNPOD_API_BASE_URL"] = self.settings.api_url
        runpod.api_key = self._key
        return fn(*args, **kwargs)

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One SDK call in a thread, under the request timeout, with errors mapped."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._in_thread, fn, *args, **kwargs),
                timeout=self.settings.request_timeout_seconds,
            )
        except TimeoutError:
            raise RetryLater(f"RunPod {what}: no answer within "
                             f"{self.settings.request_timeout_seconds:g} s", provider=PROVIDER) from None
        except Exception as exc:
            raise self._map(what, exc) from None

    def _map(self, what: str, exc: Exception) -> AdapterError:
        if isinstance(exc, AdapterError):
            return exc
        if isinstance(exc, AuthenticationError):
            return AuthError(f"RunPod {what}: the API key was refused (HTTP 401)", provider=PROVIDER)
        if isinstance(exc, QueryError):
            message = self._scrub(str(exc.message or exc))
            if _NO_CAPACITY.search(message):
                return NoCapacity(f"RunPod {what}: {message}", provider=PROVIDER)
            if _TRANSIENT.search(message):
                return RetryLater(f"RunPod {what}: {message}", provider=PROVIDER)
            return PermanentError(f"RunPod {what}: {message}", provider=PROVIDER)
        if isinstance(exc, requests.exceptions.JSONDecodeError | json.JSONDecodeError):
            # 429 / 5xx pages are not JSON; the SDK only checks for 401 itself
            return RetryLater(f"RunPod {what}: the API answered with an error page "
                              "(throttled or a server error)", provider=PROVIDER)
        if isinstance(exc, requests.exceptions.RequestException | ConnectionError | OSError):
            return RetryLater(f"RunPod {what}: {type(exc).__name__}: {self._scrub(str(exc))}",
                              provider=PROVIDER)
        if isinstance(exc, ValueError):  # the SDK's own input checks (e.g. unknown GPU type)
            return PermanentError(f"RunPod {what}: {self._scrub(str(exc))}", provider=PROVIDER)
        if isinstance(exc, KeyError | TypeError | IndexError):
            return RetryLater(f"RunPod {what}: unexpected response shape", provider=PROVIDER)
        return PermanentError(f"RunPod {what}: {type(exc).__name__}: {self._scrub(str(exc))}",
                              provider=PROVIDER)

    async def query(self, what: str, text: str) -> dict[str, Any]:
        """Run GraphQL `text` once; returns its `data` object."""
        response = await self.call(what, run_graphql_query, text, api_key=self._key)
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, dict):
            raise RetryLater(f"RunPod {what}: response without data", provider=PROVIDER)
        return data

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it does not raise RetryLater, a few times, within the budget."""
        s = self.settings

        async def run() -> T:
            async for state in AsyncRetrying(
                retry=retry_if_exception_type(RetryLater),
                stop=stop_after_attempt(s.retry_attempts) | stop_after_delay(s.retry_budget_seconds),
                wait=wait_exponential(multiplier=s.retry_base_delay_seconds, max=4),
                reraise=True,
                before_sleep=lambda rs: log.info(
                    "RunPod %s: retrying after %s", what,
                    rs.outcome.exception() if rs.outcome else "?",
                ),
            ):
                with state:
                    return await attempt()
            raise AssertionError("unreachable")  # pragma: no cover

        try:
            return await asyncio.wait_for(run(), timeout=s.retry_budget_seconds)
        except TimeoutError:
            raise RetryLater(f"RunPod {what}: gave up after {s.retry_budget_seconds:g} s",
                             provider=PROVIDER) from None
