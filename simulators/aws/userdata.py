"""Reading the job out of an instance's user-data, the way the simulator "boots" it.

The AWS adapter's user-data is a real bootstrap script for an EC2 GPU AMI (gzip-compressed, as
cloud-init accepts it) that carries the job on one machine-readable line:

    # gpuhop-job: <base64 of JSON {"version": 1, "image", "command", "env", "mount_path",
    #                               "volume_id", "device"}>

The script itself reads that line back; the simulator reads it instead of running the script,
and runs `command` through /bin/sh with `env` as a local process. User-data without the line
(any other user's instances) boots and idles.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
from dataclasses import dataclass, field

JOB_LINE = re.compile(rb"^# gpuhop-job: ([A-Za-z0-9+/=]+)\s*$", re.MULTILINE)
MAX_USER_DATA = 16384  # EC2's limit on raw user data, before base64


@dataclass(frozen=True)
class JobSpec:
    command: str
    env: dict[str, str] = field(default_factory=dict)
    mount_path: str = "/workspace"
    volume_id: str | None = None
    image: str = ""


class UserDataError(ValueError):
    """User data EC2 itself would refuse (not base64, too large)."""


def decode_user_data(encoded: str) -> bytes:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserDataError("Invalid BASE64 encoding of user data.") from exc
    if len(raw) > MAX_USER_DATA:
        raise UserDataError(f"User data is limited to {MAX_USER_DATA} bytes")
    return raw


def parse_job(raw: bytes) -> JobSpec | None:
    """The job carried by user data, or None when it carries none (or a broken one)."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    match = JOB_LINE.search(raw)
    if match is None:
        return None
    try:
        data = json.loads(base64.b64decode(match.group(1)))
        env = {str(k): str(v) for k, v in dict(data.get("env") or {}).items()}
        return JobSpec(
            command=str(data["command"]),
            env=env,
            mount_path=str(data.get("mount_path") or "/workspace"),
            volume_id=str(data["volume_id"]) if data.get("volume_id") else None,
            image=str(data.get("image") or ""),
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
