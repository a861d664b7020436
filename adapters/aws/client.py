"""Every boto3 call the AWS adapter makes goes through here: on the adapter's own bounded thread
pool, awaited to its end, and turned into the errors the engine understands.

boto3 is synchronous, so each call runs in a worker thread. A thread cannot be interrupted, so
its duration is bounded where the work happens: botocore's own `Config` carries the connect and
read timeouts and the retry budget (standard mode: throttling, 5xx and network faults are retried
with capped exponential backoff, the same request each time, so a RunInstances retried after a
lost answer keeps its ClientToken; a capacity error, which EC2 sends as a 500, is an answer and
is not retried). The coroutine that started a call waits for the thread to
finish even when it is cancelled, and only then lets the cancellation through: no call outlives
its caller, and no abandoned thread piles up on a pool the store also uses (the pool is the
adapter's, never the loop's default executor).

Failures become `RetryLater` (throttled, 5xx, network), `NoCapacity`, `QuotaExceeded` (a
`PermanentError` for the offer: the account's vCPU quota, not the market), `PermanentError` or
`AuthError`, with one-line messages from which every configured credential is removed (a proxy
or endpoint may echo them back) and without the botocore exception chained behind them.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from adapters.aws.settings import AwsSettings
from adapters.base import AdapterError, AuthError, NoCapacity, PermanentError, RetryLater

PROVIDER = "aws"
THROTTLING = {
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "TooManyRequestsException", "SlowDown", "EC2ThrottledException",
}
TRANSIENT = {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout"}
NO_CAPACITY = {
    "InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "InsufficientCapacity",
    "InsufficientHostCapacity", "Unsupported", "UnfulfillableCapacity",
}
# the account's quota, not the market's capacity: waiting does not help, another quota might
QUOTA = {"MaxSpotInstanceCountExceeded", "VcpuLimitExceeded", "InstanceLimitExceeded"}
AUTH = {
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "ExpiredToken", "AccessDenied", "AccessDeniedException", "OptInRequired", "UnrecognizedClientException",
}
BOTOCORE_MAX_BACKOFF = 20.0  # botocore's standard retry mode never sleeps longer between attempts
_KEYLIKE = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")
_URL_USERINFO = re.compile(r"//[^/@\s]+@")
T = TypeVar("T")


class QuotaExceeded(PermanentError):
    """The account's quota refused the launch (not the market's capacity): try another offer;
    this one again only once the quota has room."""


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class Redactor:
    """Removes the configured credentials (and anything shaped like an AWS key id) from text."""

    def __init__(self, secrets: list[str]) -> None:
        # longest first, so a secret that contains another is removed whole
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        text = _KEYLIKE.sub("<key>", text)
        return _URL_USERINFO.sub("//<redacted>@", text)


def one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


def classify(exc: BaseException, what: str, redact: Callable[[str], str] = Redactor([])) -> AdapterError:
    """The engine's view of a boto3 failure: one line, no credentials."""
    if isinstance(exc, AdapterError):
        return exc
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = str(exc.response.get("Error", {}).get("Message", ""))
        text = one_line(redact(f"{what}: {code}: {message}"))
        if code in THROTTLING:
            return RetryLater(text, provider=PROVIDER, delay=5.0)
        if code in NO_CAPACITY:
            return NoCapacity(text, provider=PROVIDER)
        if code in QUOTA:
            return QuotaExceeded(text, provider=PROVIDER)
        if code in AUTH:
            return AuthError(text, provider=PROVIDER)
        if code in TRANSIENT or status >= 500:
            return RetryLater(text, provider=PROVIDER, delay=5.0)
        return PermanentError(text, provider=PROVIDER)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError | ProfileNotFound):
        return AuthError(f"{what}: no usable AWS credentials ({type(exc).__name__})", provider=PROVIDER)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionClosedError):
        return RetryLater(f"{what}: {type(exc).__name__}", provider=PROVIDER, delay=5.0)
    if isinstance(exc, BotoCoreError | OSError):
        return RetryLater(f"{what}: {type(exc).__name__}", provider=PROVIDER, delay=5.0)
    return PermanentError(one_line(redact(f"{what}: {type(exc).__name__}: {exc}")), provider=PROVIDER)


class AwsApi:
    """One boto3 client per (service, region), made on first use inside a worker thread, used
    only from the adapter's own thread pool."""

    SERVICES = ("ec2", "sqs", "events", "service-quotas")

    def __init__(self, settings: AwsSettings) -> None:
        self.settings = settings
        self.redact = Redactor([
            v.get_secret_value()
            for v in (settings.access_key_id, settings.secret_access_key, settings.session_token)
            if v is not None
        ])
        self._executor = ThreadPoolExecutor(max_workers=settings.call_threads, thread_name_prefix="gpuhop-aws")
        self._clients: dict[tuple[str, str], Any] = {}
        self._session: Any = None
        self._lock = threading.Lock()  # boto3 sessions are not safe for concurrent client creation

    # ------------------------------------------------------------------ clients

    def config(self, service: str) -> Config:
        """The bounds every call of `service` runs under: botocore's own timeouts and retries."""
        return Config(
            retries={"total_max_attempts": self.settings.retry_attempts, "mode": "standard"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout(service),
            max_pool_connections=self.settings.call_threads,
            user_agent_extra="gpuhop",
        )

    @property
    def connect_timeout(self) -> float:
        return min(5.0, self.settings.request_timeout)

    def read_timeout(self, service: str) -> float:
        # SQS long-polls up to 20 s: its read timeout must outlast the poll
        return self.settings.request_timeout + (25.0 if service == "sqs" else 0.0)

    def bound_seconds(self, service: str = "ec2") -> float:
        """The longest one call (one page) can take: every attempt timing out, every backoff
        at botocore's cap."""
        attempts = self.settings.retry_attempts
        return attempts * (self.connect_timeout + self.read_timeout(service)) + (attempts - 1) * BOTOCORE_MAX_BACKOFF

    def _client(self, service: str, region: str) -> Any:
        """Only called in a worker thread."""
        if region not in self.settings.regions:
            raise PermanentError(f"region {region!r} is not configured", provider=PROVIDER)
        with self._lock:
            client = self._clients.get((service, region))
            if client is not None:
                return client
            if self._session is None:
                s = self.settings
                self._session = boto3.session.Session(
                    aws_access_key_id=_secret(s.access_key_id),
                    aws_secret_access_key=_secret(s.secret_access_key),
                    aws_session_token=_secret(s.session_token),
                )
            try:
                client = self._session.client(
                    service, region_name=region, endpoint_url=self.settings.endpoint_url, config=self.config(service)
                )
            except ValueError as exc:  # a malformed endpoint_url
                raise PermanentError(one_line(self.redact(f"cannot reach AWS {service} in {region}: {exc}")), provider=PROVIDER) from None
            if service == "ec2":
                client.meta.events.register_first("needs-retry.ec2", _capacity_is_an_answer)
            self._clients[(service, region)] = client
            return client

    # ------------------------------------------------------------------ calls

    async def call(
        self, service: str, region: str, operation: str, *, expect: frozenset[str] = frozenset(), **kwargs: Any
    ) -> dict[str, Any]:
        """Call `operation`; a ClientError whose code is in `expect` is re-raised untouched for
        the caller to handle, every other failure becomes an AdapterError."""

        def invoke() -> dict[str, Any]:
            result: dict[str, Any] = getattr(self._client(service, region), operation)(**kwargs)
            return result

        return await self._run(invoke, f"{operation} in {region}", expect)

    async def paginate(
        self, service: str, region: str, operation: str, key: str, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Every item under `key` across all pages (each page retried by botocore)."""

        def invoke() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            for page in self._client(service, region).get_paginator(operation).paginate(**kwargs):
                items.extend(page.get(key, []))
            return items

        return await self._run(invoke, f"{operation} in {region}", frozenset())

    async def _run(self, invoke: Callable[[], T], what: str, expect: frozenset[str]) -> T:
        redact = self.redact

        def guarded() -> T:
            try:
                return invoke()
            except ClientError as exc:
                if error_code(exc) in expect:
                    raise
                error = classify(exc, what, redact)
            except Exception as exc:  # every failure leaves as an AdapterError
                error = classify(exc, what, redact)
            raise error  # outside the except block: no botocore exception chained behind it

        return await self.in_thread(guarded)

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the adapter's pool and wait for it to end, even when cancelled meanwhile
        (the cancellation is passed on once the thread is done; botocore's timeouts bound it)."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except RuntimeError:  # the pool was shut down: the adapter is closed
            raise RetryLater("the AWS adapter is closed", provider=PROVIDER) from None
        cancelled = False
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            if not future.cancelled():
                future.exception()  # retrieved: the caller has gone, its answer with it
            raise asyncio.CancelledError
        return future.result()

    def close(self) -> None:
        """No new calls; calls under way finish on their own (their callers await them)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _capacity_is_an_answer(response: Any = None, **_: Any) -> None:
    """botocore retries every 5xx, and EC2 sends InsufficientInstanceCapacity as a 500: that is
    an answer (the engine tries another offer at once), not a fault worth seconds of backoff.
    Runs before botocore's retry check and lets it see such an answer as a client error."""
    if not response:
        return
    http, parsed = response
    code = (parsed or {}).get("Error", {}).get("Code") if isinstance(parsed, dict) else None
    if code in NO_CAPACITY and http is not None and getattr(http, "status_code", 0) >= 500:
        http.status_code = 400


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None
