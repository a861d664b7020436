"""The CLI's HTTP client: finds the daemon (GPUHOP_SERVER/GPUHOP_TOKEN, or the server file and
token in the state dir on the same host) and turns every failure into a message that says what
to do. Synchronous on purpose: a CLI call is one request at a time."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import auth
from orchestrator.config import DEFAULT_PORT, default_state_dir


class ClientError(Exception):
    """Something the user can act on; the message says what."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Client:
    url: str
    token: str
    timeout: float = 30.0

    @classmethod
    def discover(cls, server: str | None = None, token: str | None = None, state_dir: Path | None = None) -> Client:
        state = state_dir or default_state_dir()
        url = server or os.environ.get("GPUHOP_SERVER")
        if not url:
            try:
                url = json.loads((state / "server.json").read_text())["url"]
            except (OSError, ValueError, KeyError):
                url = f"http://127.0.0.1:{DEFAULT_PORT}"
        tok = token or os.environ.get("GPUHOP_TOKEN") or auth.read_api_token(state)
        if not tok:
            raise ClientError(
                f"no API token: set GPUHOP_TOKEN, or run this on the daemon's host as a user who can read "
                f"{state / 'token'} (or pass --state-dir)"
            )
        return cls(url.rstrip("/"), tok)

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None,
              content_type: str = "application/json") -> Any:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type, "Accept": "application/json",
        })
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ClientError(f"{message}", exc.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach the gpuhop daemon at {self.url} ({reason}); is it running? Start it with "
                "`gpuhop serve`, or point GPUHOP_SERVER at it"
            ) from None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
        return json.loads(raw) if "json" in ctype else raw.decode("utf-8", "replace")

    def put_bytes(self, path: str, data: bytes, content_type: str) -> Any:
        """PUT a binary body (a workdir archive); the JSON answer."""
        with self._open("PUT", path, data, timeout=max(self.timeout, 300.0), content_type=content_type) as resp:
            return json.loads(resp.read())

    def submit(self, spec: dict[str, Any], force: bool = False, reuse_volume: bool = False) -> dict[str, Any]:
        flags = [f"{name}=true" for name, on in (("force", force), ("reuse_volume", reuse_volume)) if on]
        result: dict[str, Any] = self.request("POST", "/v1/jobs" + ("?" + "&".join(flags) if flags else ""), spec)
        return result

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        q = f"?status={urllib.parse.quote(status)}" if status else ""
        jobs: list[dict[str, Any]] = self.request("GET", f"/v1/jobs{q}")["jobs"]
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}")
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/cancel")
        return result

    def costs(self, since: str = "30d", by: str = "provider") -> dict[str, Any]:
        q = urllib.parse.urlencode({"since": since, "by": by})
        result: dict[str, Any] = self.request("GET", f"/v1/costs?{q}")
        return result

    def volumes(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/volumes")
        return result

    def delete_volume(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("DELETE", f"/v1/volumes/{urllib.parse.quote(name, safe='')}")
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/status")
        return result

    def offers(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/offers")
        return result

    def logs(self, job_id: str, tail: int = 0, follow: bool = False) -> Iterator[bytes]:
        q = urllib.parse.urlencode({"tail": tail, "follow": str(follow).lower()})
        resp = self._open("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/logs?{q}",
                          timeout=None if follow else self.timeout)
        with resp:
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    break
                yield chunk
