"""`gpuhop sim ...`: run one provider simulator on its own, for trying gpuhop (or any RunPod or
AWS client) against a provider that costs nothing. Registered through the `gpuhop.cli` entry
point group so the core CLI does not import simulators."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

sim_app = typer.Typer(help="Run a provider simulator on loopback (RunPod GraphQL, AWS EC2, S3).", no_args_is_help=True)


@sim_app.command("runpod")
def runpod(
    port: Annotated[int, typer.Option("--port", help="TCP port on 127.0.0.1")] = 8481,
    catalog: Annotated[Path | None, typer.Option("--catalog", help="TOML catalogue of data centers and GPUs")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="the key to accept (default: a random one, printed)")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="pod logs and volume directories")] = None,
    notice_seconds: Annotated[float, typer.Option("--notice-seconds", help="SIGTERM to SIGKILL on preemption")] = 5.0,
    start_delay: Annotated[float, typer.Option("--start-delay", help="seconds before a pod's container runs")] = 2.0,
) -> None:
    """Simulated RunPod: GraphQL at /graphql, admin API at /_sim/."""
    from simulators.runpod import main

    main(port=port, catalog=catalog, api_key=api_key, state_dir=state_dir, notice_seconds=notice_seconds,
         start_delay=start_delay)


@sim_app.command("aws")
def aws(
    port: Annotated[int, typer.Option("--port", help="TCP port on 127.0.0.1")] = 8482,
    catalog: Annotated[Path | None, typer.Option("--catalog", help="TOML catalogue of instance types and prices")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="instance logs and volume directories")] = None,
    notice_seconds: Annotated[float, typer.Option("--notice-seconds", help="spot interruption warning period")] = 120.0,
    boot_delay: Annotated[float, typer.Option("--boot-delay", help="seconds from pending to running")] = 1.0,
) -> None:
    """Simulated AWS EC2/SQS/EventBridge (moto plus capacity, prices and interruptions)."""
    from simulators.aws import main

    main(port=port, catalog=catalog, state_dir=state_dir, notice_seconds=notice_seconds, boot_delay=boot_delay)


@sim_app.command("s3")
def s3(
    port: Annotated[int, typer.Option("--port", help="TCP port on 127.0.0.1")] = 8483,
    access_key_id: Annotated[str | None, typer.Option("--access-key-id", help="the one key it accepts (default: random, printed)")] = None,
    secret_access_key: Annotated[str | None, typer.Option("--secret-access-key", help="its secret (default: random, printed)")] = None,
    region: Annotated[str, typer.Option("--region", help="the region requests must be signed for")] = "us-east-1",
    bucket: Annotated[list[str] | None, typer.Option("--bucket", help="a bucket to create at start (repeatable)")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="unused: objects are kept in memory")] = None,
) -> None:
    """Simulated S3 (moto) that checks SigV4 signatures and presigned URL expiry, for checkpoint sync."""
    from simulators.s3 import main

    main(port=port, access_key_id=access_key_id, secret_access_key=secret_access_key, region=region,
         buckets=bucket or [])
