"""The CLI's half of a job's working directory: find it (`workdir = "."` in the job file, relative
to the file's directory, or `gpuhop submit --workdir DIR`), pack it (orchestrator.workdir), check
its size before anything is sent, and upload it to the daemon under its sha256. The spec the
daemon receives then names the archive (`workdir_sha256`), never a path on this machine.

A module of its own so that cli.py stays a list of commands; it raises WorkdirError or
ClientError with the message to show, and changes nothing on the daemon until the archive is
known to be acceptable here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator import workdir
from orchestrator.client import Client, ClientError


def take_workdir(spec: dict[str, Any], spec_file: Path, option: Path | None) -> Path | None:
    """Remove `workdir` from the job file's table and say which directory it names (the
    --workdir option wins; a path in the file is relative to the file's directory)."""
    raw = spec.pop("workdir", None)
    if option is not None:
        return option
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise workdir.WorkdirError(f"{spec_file}: workdir must be a directory path such as \".\"")
    return spec_file.parent / os.path.expanduser(raw)


def max_bytes() -> int:
    """The limit checked here before uploading: the daemon's default, or GPUHOP_WORKDIR_MAX_MB for
    a daemon configured otherwise (the daemon enforces its own [workdirs] max_mb in any case)."""
    try:
        return int(float(os.environ.get("GPUHOP_WORKDIR_MAX_MB", "")) * workdir.MB)
    except ValueError:
        return workdir.DEFAULT_MAX_BYTES


def upload(client: Client, directory: Path) -> str:
    """Pack and upload `directory`; its sha256."""
    limit = max_bytes()
    data, tree = workdir.pack(directory, limit)
    sha = workdir.sha256(data)
    try:
        client.put_bytes(f"/v1/workdirs/{sha}", data, "application/gzip")
    except ClientError as exc:
        if exc.status == 413:  # the daemon's limit is lower than ours: say what to leave out
            raise workdir.WorkdirError(f"{exc} (the biggest entries: " + ", ".join(
                f"{name} {workdir.human(size)}" for name, size in tree.biggest()) + ")") from None
        raise
    return sha
