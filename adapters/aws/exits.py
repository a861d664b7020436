"""Reading a job's exit from the instance's serial console, for when the agent's exit report
never reached the daemon (the machine powers off right after the job ends, so a lost report
would otherwise make a finished job look lost and run again).

The agent prints one line when the job ends, and cloud-init passes user-data output to the
serial console, which EC2 serves through `GetConsoleOutput`:

    gpuhop-exit: {"attempt": "<attempt name>", "exit_code": <int|null>, "exit_signal": <int|null>, "sigterm": <bool>}

The console may prefix lines (timestamps, `cloud-init[811]: `) and end them with CR; the JSON is
read from just after the prefix. The last line for the attempt wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PREFIX = "gpuhop-exit: "


@dataclass(frozen=True)
class ExitLine:
    attempt: str
    exit_code: int | None
    exit_signal: int | None
    sigterm: bool


def _int_or_none(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("not an int")
    return value


def parse_exit(console: str, attempt: str) -> ExitLine | None:
    """The last well-formed exit line for `attempt` in the console text, or None."""
    decoder = json.JSONDecoder()
    found: ExitLine | None = None
    for line in console.splitlines():
        at = line.find(PREFIX)
        if at < 0:
            continue
        try:
            data, _ = decoder.raw_decode(line[at + len(PREFIX):].strip())
            if not isinstance(data, dict) or data.get("attempt") != attempt:
                continue
            sigterm = data.get("sigterm", False)
            found = ExitLine(
                attempt=attempt,
                exit_code=_int_or_none(data.get("exit_code")),
                exit_signal=_int_or_none(data.get("exit_signal")),
                sigterm=sigterm if isinstance(sigterm, bool) else False,
            )
        except ValueError:
            continue
    return found
