"""The AWS adapter when its provider fails at start: no credentials, the SQS/EventBridge
plumbing for spot warnings failing, no network. `start()` raises a one-line adapter error
(no botocore traceback behind it), can be called again once the fault is gone, and until then
`poll_interruptions()` raises RetryLater while listings work as usual."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.aws.settings import AwsSettings
from adapters.base import AdapterContext, AdapterError, AuthError, RetryLater
from simulators.aws import AwsSimulator
from tests.aws_fixtures import admin, clean_up, make_adapter, running_simulator


def assert_one_line(error: AdapterError) -> None:
    assert "\n" not in str(error) and str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator


@pytest.fixture
async def aws(sim: AwsSimulator, tmp_path: Path) -> AsyncIterator[AwsAdapter]:
    adapter = make_adapter(sim, tmp_path, retry_attempts=2)
    yield adapter
    await clean_up(adapter, sim)


async def test_failing_plumbing_is_retried_later_and_start_works_once_it_heals(aws: AwsAdapter, sim: AwsSimulator) -> None:
    await admin(sim, "POST", "/_sim/faults", {"code": "InternalError", "rate": 1.0, "services": ["sqs"], "actions": ["CreateQueue"]})
    with pytest.raises(RetryLater) as raised:
        await aws.start()
    assert_one_line(raised.value)
    assert "create_queue" in str(raised.value)
    with pytest.raises(RetryLater):
        await aws.poll_interruptions(0)
    assert await aws.list_instances() == []  # listings do not need the plumbing

    await admin(sim, "DELETE", "/_sim/faults")
    await aws.start()  # again, after the failure
    await aws.start()  # and again: nothing is made twice
    assert await aws.poll_interruptions(0) == []


async def test_refused_credentials_at_start_are_an_auth_error(aws: AwsAdapter, sim: AwsSimulator) -> None:
    await admin(sim, "POST", "/_sim/faults", {"code": "AccessDenied", "rate": 1.0, "services": ["events"], "actions": ["PutRule"]})
    with pytest.raises(AuthError) as raised:
        await aws.start()
    assert_one_line(raised.value)
    with pytest.raises(RetryLater, match="not set up yet"):  # the warnings loop keeps going
        await aws.poll_interruptions(0)


async def test_no_credentials_at_all(sim: AwsSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    aws = make_adapter(sim, tmp_path, access_key_id=None, secret_access_key=None)
    try:
        with pytest.raises(AuthError, match="no usable AWS credentials") as raised:
            await aws.start()
        assert_one_line(raised.value)
        with pytest.raises(AuthError):
            await aws.list_instances()
    finally:
        await aws.close()


async def test_no_network(tmp_path: Path) -> None:
    """No simulator at all: nothing answers."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = AwsSettings.model_validate({
        "regions": ["us-east-1"], "endpoint_url": f"http://127.0.0.1:{port}",
        "access_key_id": "testing", "secret_access_key": "testing", "retry_attempts": 2, "request_timeout": 2,
    })
    aws = AwsAdapter(settings, AdapterContext(prefix="gh", state_dir=tmp_path, logs_dir=tmp_path, public_url=""))
    try:
        with pytest.raises(RetryLater, match="EndpointConnectionError") as raised:
            await aws.start()
        assert_one_line(raised.value)
        with pytest.raises(RetryLater):
            await aws.list_instances()
        with pytest.raises(RetryLater):
            await aws.poll_interruptions(0)
    finally:
        await aws.close()
