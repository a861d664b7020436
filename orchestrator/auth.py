"""Secrets the daemon keeps: the API bearer token and the key that signs per-attempt agent
tokens. Both live in the state dir with mode 0600 and are never logged or returned by the API.

An agent's token is HMAC(key, attempt name): the daemon can check it without storing it, and a
relaunch under the same name (an idempotent retry) gets the same token. That is sound only while
no job can read `agent.key`: with it, any token could be minted and any attempt's exit forged.
Cloud jobs never see the daemon's disk. Local jobs are kept off the state dir by the local
adapter's isolation (a container, or a uid of their own; the state dir is 0700 and both files
0600, re-tightened here if found looser); under `isolation = "none"` they are not, and the
daemon warns so at start-up. A job never gets even its own attempt's token: only its agent holds
it, and a report for an attempt that has ended is refused (410) whatever its token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

TOKEN_FILE = "token"
AGENT_KEY_FILE = "agent.key"


def _read_or_create(path: Path, nbytes: int) -> str:
    try:
        value = path.read_text().strip()
        if value:
            if path.stat().st_mode & 0o077:  # written by hand, or by an older gpuhop
                os.chmod(path, 0o600)
            return value
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)
    return value


def api_token(state_dir: Path, configured: str | None = None) -> str:
    """The configured token, else GPUHOP_TOKEN, else the one in the state dir (made once)."""
    return configured or os.environ.get("GPUHOP_TOKEN") or _read_or_create(state_dir / TOKEN_FILE, 32)


def keep(path: Path, value: str) -> str:
    """Make `path` hold `value` (mode 0600): a replica's copy of a secret the cluster shares."""
    try:
        if path.read_text().strip() == value:
            return value
    except FileNotFoundError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return value


def read_api_token(state_dir: Path) -> str | None:
    """For the CLI on the daemon's host: the token file, if this user may read it."""
    try:
        return (state_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def agent_key(state_dir: Path) -> bytes:
    return _read_or_create(state_dir / AGENT_KEY_FILE, 32).encode()


def attempt_token(key: bytes, attempt_name: str) -> str:
    return hmac.new(key, attempt_name.encode(), hashlib.sha256).hexdigest()


def check_attempt_token(key: bytes, attempt_name: str, token: str) -> bool:
    return hmac.compare_digest(attempt_token(key, attempt_name), token or "")


def same_secret(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), (given or "").encode())
