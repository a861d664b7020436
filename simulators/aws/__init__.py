"""A local AWS for gpuhop: EC2, SQS and EventBridge on loopback, where instances run their job
as local processes and spot instances can be interrupted on demand.

In process:

    sim = AwsSimulator(state_dir, catalog_path=None, notice_seconds=120.0, boot_delay=1.0)
    endpoint = await sim.start(host="127.0.0.1", port=0)   # boto3 endpoint_url
    ...
    await sim.stop()

From a shell: `gpuhop sim aws --port N [--catalog FILE] [--state-dir DIR] [--notice-seconds S]`,
which calls `main(...)`.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

from simulators.aws.server import AwsSimulator

__all__ = ["AwsSimulator", "main"]


def main(
    port: int = 0,
    catalog: Path | None = None,
    state_dir: Path | None = None,
    notice_seconds: float = 120.0,
    host: str = "127.0.0.1",
    boot_delay: float = 1.0,
    require_imdsv2: bool = False,
    default_vpc: bool = True,
) -> None:
    """Run the simulator until SIGINT or SIGTERM, printing its endpoint URL. `require_imdsv2`:
    refuse launches that allow IMDSv1 (as an organisation's SCP does); `default_vpc=False`: an
    account without default VPCs (both can also be set through `POST /_sim/policy`)."""

    async def serve() -> None:
        root = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="gpuhop-sim-aws-"))
        sim = AwsSimulator(
            root, catalog_path=catalog, notice_seconds=notice_seconds, boot_delay=boot_delay,
            require_imdsv2=require_imdsv2, default_vpc=default_vpc,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = await sim.start(host=host, port=port)
        print(f"AWS simulator listening on {url} (account {sim.account_id}, state in {root})", flush=True)
        print(f"  boto3: endpoint_url={url!r}, any credentials; admin API under {url}/_sim/", flush=True)
        try:
            await stop.wait()
        finally:
            await sim.stop()

    asyncio.run(serve())
