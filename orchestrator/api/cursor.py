"""The cursor of `GET /v1/jobs` pages: where the previous page ended (the last job's creation
time and id), so that the next page starts right after it however many jobs arrive meanwhile
(keyset pagination: no OFFSET that shifts, no rescan of what was already shown).

Opaque to clients but not secret; parsed strictly, since it arrives from outside.
"""

from __future__ import annotations

import math
import re
import struct

CURSOR_PATTERN = r"^[0-9a-f]{16}\.[a-z0-9]{1,32}$"
_CURSOR_RE = re.compile(CURSOR_PATTERN[1:-1])


def encode_cursor(created_at: float, job_id: str) -> str:
    """The exact float (its 64 bits in hex: no rounding through decimal) and the job id."""
    return f"{struct.pack('>d', created_at).hex()}.{job_id}"


def decode_cursor(raw: str) -> tuple[float, str] | None:
    """(created_at, job id), or None for anything encode_cursor could not have made."""
    if not _CURSOR_RE.fullmatch(raw):
        return None
    bits, job_id = raw.split(".", 1)
    (at,) = struct.unpack(">d", bytes.fromhex(bits))
    return (at, job_id) if math.isfinite(at) else None
