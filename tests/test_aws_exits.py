"""A job's exit read from the instance's serial console, for when the agent's report never
reached the daemon: the parser, the simulator's GetConsoleOutput (what the process printed, as
EC2 posts it), and the adapter's listing (an ended instance carries its exit, read once)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.aws import AwsAdapter
from adapters.aws.exits import ExitLine, parse_exit
from orchestrator.models import CapacityType, Instance, InstanceState
from simulators.aws import AwsSimulator
from tests.aws_fixtures import (
    admin,
    call,
    clean_up,
    client,
    describe_instance,
    make_adapter,
    offer_for,
    request,
    running_simulator,
    wait_for,
)


def test_the_last_line_for_the_attempt_wins() -> None:
    console = (
        "[    0.0] Linux version 6.8\r\n"
        'gpuhop-exit: {"attempt": "gh-a-1", "exit_code": 1, "exit_signal": null, "sigterm": false}\r\n'
        'gpuhop-exit: {"attempt": "gh-a-10", "exit_code": 7, "exit_signal": null, "sigterm": false}\n'
        'gpuhop-exit: {"attempt": "gh-a-1", "exit_code": 2, "exit_sig\n'  # cut short: ignored
        '[   12.3] cloud-init[811]: gpuhop-exit: {"attempt": "gh-a-1", "exit_code": null, "exit_signal": 9, "sigterm": true}\r\n'
        'gpuhop-exit: {"attempt": "gh-a-1", "exit_code": "3", "exit_signal": null, "sigterm": false}\n'  # not an int
        "reboot: Power down\n"
    )
    assert parse_exit(console, "gh-a-1") == ExitLine("gh-a-1", None, 9, True)
    assert parse_exit(console, "gh-a-10") == ExitLine("gh-a-10", 7, None, False)
    assert parse_exit(console, "gh-a-2") is None
    assert parse_exit("", "gh-a-1") is None


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[AwsSimulator]:
    async with running_simulator(tmp_path / "sim") as simulator:
        yield simulator


async def test_console_output_is_what_the_instance_printed_posted_at_the_end(sim: AwsSimulator, tmp_path: Path) -> None:
    import base64
    import json

    doc = {"version": 1, "image": "x", "command": "echo hello from the job; sleep 0.5; echo bye", "env": {}}
    line = base64.b64encode(json.dumps(doc).encode()).decode()
    ec2 = client(sim, "ec2")
    answer = await call(
        ec2.run_instances, ImageId="ami-12345678", InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        Placement={"AvailabilityZone": "us-east-1a"}, UserData=f"#!/bin/bash\n# gpuhop-job: {line}\n",
        InstanceInitiatedShutdownBehavior="terminate",
    )
    iid = answer["Instances"][0]["InstanceId"]
    await wait_for(lambda: describe_instance(ec2, iid), lambda i: i["State"]["Name"] == "running")
    booted = (await call(ec2.get_console_output, InstanceId=iid)).get("Output", "")
    assert "Linux version" in booted and "hello" not in booted and "Xen" not in booted  # not moto's text
    latest = await wait_for(lambda: call(ec2.get_console_output, InstanceId=iid, Latest=True), lambda a: "hello" in a.get("Output", ""))
    assert "bye" not in latest["Output"]
    await wait_for(lambda: describe_instance(ec2, iid), lambda i: i["State"]["Name"] == "terminated")
    ended = (await call(ec2.get_console_output, InstanceId=iid))["Output"]
    assert ended.index("Linux version") < ended.index("hello from the job") < ended.index("bye")


@pytest.fixture
async def aws(sim: AwsSimulator, tmp_path: Path) -> AsyncIterator[AwsAdapter]:
    adapter = make_adapter(sim, tmp_path)
    await adapter.start()
    yield adapter
    await clean_up(adapter, sim)


async def _listed(aws: AwsAdapter, instance_id: str) -> Instance | None:
    return next((i for i in await aws.list_instances() if i.instance_id == instance_id), None)


async def test_an_ended_instance_carries_the_exit_its_console_shows_read_once(aws: AwsAdapter, sim: AwsSimulator) -> None:
    """No daemon hears the agent here (no callback URL): only the console can tell the exit."""
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.ON_DEMAND)
    req = request(offer, "exits", 1, [
        "python3", "-c",
        "import sys; print('gpuhop-exit: {\"attempt\": \"gh-exits-1\", \"exit_code\": 0, \"exit_signal\": null, \"sigterm\": false}');"
        " print('working', flush=True); sys.exit(3)",
    ])
    launched = await aws.launch(req)
    ended = await wait_for(
        lambda: _listed(aws, launched.instance_id),
        lambda i: i is not None and i.extra["ec2_state"] == "terminated", timeout=20,
    )
    assert ended is not None
    assert (ended.state, ended.exit_code, ended.exit_signal) == (InstanceState.EXITED, 3, None)
    assert ended.extra["exit_sigterm"] == "false"
    asked = sim.ec2.calls["GetConsoleOutput"]
    assert 1 <= asked <= 2  # once, and once more if it was first asked while shutting down
    for _ in range(3):
        again = await _listed(aws, launched.instance_id)
        assert again is not None and again.exit_code == 3 and again.state is InstanceState.EXITED
    assert sim.ec2.calls["GetConsoleOutput"] == asked


async def test_a_running_instance_is_not_asked_and_a_reclaim_stays_preempted(aws: AwsAdapter, sim: AwsSimulator) -> None:
    offer = offer_for(await aws.offers(), "g5.xlarge", "us-east-1a", CapacityType.SPOT)
    said = '{"attempt": "gh-reclaim-1", "exit_code": 0, "exit_signal": null, "sigterm": false}'
    launched = await aws.launch(request(offer, "reclaim", 1, [
        "python3", "-c", f"import time; print('gpuhop-exit: ' + {said!r}, flush=True); time.sleep(60)",
    ]))
    await wait_for(lambda: _listed(aws, launched.instance_id), lambda i: i is not None and i.state is InstanceState.RUNNING)
    assert sim.ec2.calls["GetConsoleOutput"] == 0
    ec2 = client(sim, "ec2")
    await wait_for(
        lambda: call(ec2.get_console_output, InstanceId=launched.instance_id, Latest=True),
        lambda a: "gpuhop-exit" in a.get("Output", ""),
    )
    await admin(sim, "POST", f"/_sim/instances/{launched.instance_id}/interrupt", {"notice_seconds": 0})
    ended = await wait_for(
        lambda: _listed(aws, launched.instance_id),
        lambda i: i is not None and i.extra["ec2_state"] == "terminated" and "exit_sigterm" in i.extra, timeout=20,
    )
    # the exit line was read (the job's own, or the agent's after the reclaim's SIGTERM)...
    assert ended is not None and (ended.exit_code is not None or ended.exit_signal is not None or ended.extra["exit_sigterm"] == "true")
    assert ended.state is InstanceState.PREEMPTED  # ...and the reclaim is still what ended it
