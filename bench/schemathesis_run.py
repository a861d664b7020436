"""Fuzz the live API with schemathesis from its own /v1/openapi.json, every check on, and print
the numbers: test cases, server errors, schema violations and other failures.

A real `gpuhop serve` process on the local provider with no slots (nothing a fuzzed spec asks
for ever runs on this machine), the API token as the bearer for every request. Needs
`pip install schemathesis`.

    python bench/schemathesis_run.py [--max-examples 250] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.client import Client, ClientError  # noqa: E402
from simulators.harness import Daemon  # noqa: E402

CONFIG = """
[engine]
tick_seconds = 1
[providers.local]
cpu_slots = 0
gpu_slots = 0
"""


def cancel_queued(client: Client, stop: threading.Event) -> None:
    """Nothing runs in the fuzzed daemon, so a job would stay queued and a generated
    logs?follow=true would stream forever: cancel every job soon after it is submitted."""
    while not stop.wait(0.3):
        try:
            for job in client.jobs("queued"):
                client.cancel(job["id"])
        except ClientError:
            continue


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=250, help="per operation and phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", default="1")
    args = ap.parse_args()
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        print("schemathesis is not installed: pip install schemathesis", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpuhop-st-") as tmp:
        daemon = Daemon(Path(tmp) / "state", CONFIG, log_level="INFO")
        client = daemon.start()
        report = Path(tmp) / "report.ndjson"
        stop = threading.Event()
        canceller = threading.Thread(target=cancel_queued, args=(client, stop), daemon=True)
        canceller.start()
        try:
            env = {**os.environ, "SCHEMATHESIS_HOOKS": "bench.schemathesis_hooks", "PYTHONPATH": str(REPO)}
            config = Path(tmp) / "schemathesis.toml"
            # 413 (a body past 1 MiB, which no JSON Schema can express) is a rejection too
            config.write_text('[checks.negative_data_rejection]\nexpected-statuses = '
                              '["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]\n')
            cmd = [str(st), "--config-file", str(config), "run", f"{client.url}/v1/openapi.json", "--checks", "all",
                   "--header", f"Authorization: Bearer {client.token}",
                   "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                   "--workers", args.workers, "--request-timeout", "30", "--continue-on-failure",
                   "--suppress-health-check", "all", "--generation-database", "none", "--no-color", "--output-truncate", "true",
                   "--report", "ndjson", "--report-ndjson-path", str(report)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            out = proc.stdout + proc.stderr
            (Path(tempfile.gettempdir()) / "gpuhop-schemathesis-last.txt").write_text(out)  # the full output
            print(out[-6000:])
            daemon_log = daemon.log()
        finally:
            stop.set()
            canceller.join()
            daemon.stop()
    cases = re.search(r"(\d+) generated", out)
    server_errors = len(re.findall(r"Server error", out))
    schema_violations = len(re.findall(r"Response violates schema|Undocumented HTTP status code|"
                                       r"Undocumented Content-Type|Missing header", out))
    print(json.dumps({
        "exit_code": proc.returncode,
        "test_cases": int(cases.group(1)) if cases else None,
        "server_errors": server_errors,
        "schema_violations": schema_violations,
        "unhandled_in_daemon_log": daemon_log.count("unhandled error"),
    }))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
