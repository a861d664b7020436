"""Every boto3 call the AWS adapter makes goes through here: off the event loop, retried when
EC2 throttles or fails transiently, and turned into the errors the engine understands.

boto3 is synchronous, so each call runs in a worker thread (`asyncio.to_thread`) on a client made
once per (service, region). botocore's own retries are switched off and tenacity retries instead
(bounded in attempts and seconds) so that the budget is ours and visible: throttling and 5xx
become `RetryLater` when it runs out, capacity errors `NoCapacity`, bad requests and quotas
`PermanentError`, refused credentials `AuthError`. Messages never carry credentials.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
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
    "InsufficientHostCapacity", "Unsupported", "MaxSpotInstanceCountExceeded",
}
AUTH = {
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "ExpiredToken", "AccessDenied", "AccessDeniedException", "OptInRequired", "UnrecognizedClientException",
}
_KEYLIKE = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")


class _Transient(Exception):
    """A failure worth another try (throttled, 5xx, network)."""

    def __init__(self, error: AdapterError) -> None:
        super().__init__(str(error))
        self.error = error


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def classify(exc: Exception, what: str) -> AdapterError:
    """The engine's view of a boto3 failure."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = _KEYLIKE.sub("<key>", str(exc.response.get("Error", {}).get("Message", "")))[:300]
        text = f"{what}: {code}: {message}"
        if code in THROTTLING:
            return RetryLater(text, provider=PROVIDER, delay=5.0)
        if code in NO_CAPACITY:
            return NoCapacity(text, provider=PROVIDER)
        if code in AUTH:
            return AuthError(text, provider=PROVIDER)
        if code in TRANSIENT or status >= 500:
            return RetryLater(text, provider=PROVIDER, delay=5.0)
        return PermanentError(text, provider=PROVIDER)
    if isinstance(exc, NoCredentialsError):
        return AuthError(f"{what}: no AWS credentials found", provider=PROVIDER)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionClosedError):
        return RetryLater(f"{what}: {type(exc).__name__}", provider=PROVIDER, delay=5.0)
    if isinstance(exc, BotoCoreError):
        return RetryLater(f"{what}: {type(exc).__name__}", provider=PROVIDER, delay=5.0)
    return PermanentError(f"{what}: {type(exc).__name__}: {exc}"[:400], provider=PROVIDER)


class AwsApi:
    """One boto3 client per (service, region), used only from worker threads."""

    SERVICES = ("ec2", "sqs", "events")

    def __init__(self, settings: AwsSettings) -> None:
        self.settings = settings
        session = boto3.session.Session(
            aws_access_key_id=_secret(settings.access_key_id),
            aws_secret_access_key=_secret(settings.secret_access_key),
            aws_session_token=_secret(settings.session_token),
        )
        self._clients: dict[tuple[str, str], Any] = {}
        for region in settings.regions:
            for service in self.SERVICES:
                # SQS long-polls up to 20 s: its read timeout must outlast the poll
                read = settings.request_timeout + (25 if service == "sqs" else 0)
                config = Config(
                    region_name=region,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=min(5.0, settings.request_timeout),
                    read_timeout=read,
                    max_pool_connections=16,
                    user_agent_extra="gpuhop",
                )
                self._clients[(service, region)] = session.client(
                    service, region_name=region, endpoint_url=settings.endpoint_url, config=config  # type: ignore[call-overload]
                )

    def client(self, service: str, region: str) -> Any:
        try:
            return self._clients[(service, region)]
        except KeyError:
            raise PermanentError(f"region {region!r} is not configured", provider=PROVIDER) from None

    async def call(
        self, service: str, region: str, operation: str, *, expect: frozenset[str] = frozenset(), **kwargs: Any
    ) -> dict[str, Any]:
        """Call `operation`; a ClientError whose code is in `expect` is re-raised untouched for
        the caller to handle, every other failure becomes an AdapterError."""
        client = self.client(service, region)

        def invoke() -> dict[str, Any]:
            result: dict[str, Any] = getattr(client, operation)(**kwargs)
            return result

        return await self._run(invoke, f"{operation} in {region}", expect)

    async def paginate(
        self, service: str, region: str, operation: str, key: str, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Every item under `key` across all pages (retried as a whole)."""
        client = self.client(service, region)

        def invoke() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            for page in client.get_paginator(operation).paginate(**kwargs):
                items.extend(page.get(key, []))
            return items

        return await self._run(invoke, f"{operation} in {region}", frozenset())

    async def _run(self, invoke: Any, what: str, expect: frozenset[str]) -> Any:
        def guarded() -> Any:
            try:
                return invoke()
            except ClientError as exc:
                if error_code(exc) in expect:
                    raise
                mapped = classify(exc, what)
                if isinstance(mapped, RetryLater):
                    raise _Transient(mapped) from exc
                raise mapped from exc
            except (BotoCoreError, OSError) as exc:
                mapped = classify(exc, what)
                if isinstance(mapped, RetryLater):
                    raise _Transient(mapped) from exc
                raise mapped from exc

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(self.settings.retry_attempts) | stop_after_delay(self.settings.retry_max_seconds),
            wait=wait_exponential(multiplier=0.2, max=2.0) + wait_random(0, 0.2),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await asyncio.to_thread(guarded)
        except _Transient as exc:
            raise exc.error from exc.__cause__
        raise AssertionError("unreachable")  # pragma: no cover


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None
