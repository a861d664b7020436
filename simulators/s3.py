"""An S3 stand-in on loopback for checkpoint sync: moto's S3 behind a check of every request's
AWS Signature Version 4, as S3 does it.

moto alone accepts any signature and any expired presigned URL, so a test against it could not
tell a working presigned URL from a forged or stale one. This wraps moto's WSGI app: a request
must be signed (Authorization header or presigned query) with the one access key this simulator
knows, for its region; a presigned URL is refused after X-Amz-Date + X-Amz-Expires, a signed
header request more than 15 minutes from its X-Amz-Date. Refusals are S3's own 403 XML errors
(AccessDenied, SignatureDoesNotMatch, InvalidAccessKeyId). `GET /_sim/health` answers unsigned,
and `GET /_sim/requests` lists the last requests (method, URI, headers) for tests to inspect.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

ALGORITHM = "AWS4-HMAC-SHA256"
CLOCK_SKEW = 15 * 60
MAX_EXPIRES = 7 * 86400
StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _q(text: str) -> str:
    return quote(text, safe="-_.~")


def _query_pairs(raw: str) -> list[tuple[str, str]]:
    pairs = []
    for part in raw.split("&"):
        if part:
            key, _, value = part.partition("=")
            pairs.append((unquote(key.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _header(environ: dict[str, Any], name: str) -> str:
    if name == "content-type":
        return str(environ.get("CONTENT_TYPE", ""))
    if name == "content-length":
        return str(environ.get("CONTENT_LENGTH", ""))
    return str(environ.get("HTTP_" + name.upper().replace("-", "_"), ""))


def _amz_time(stamp: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None


class SigV4Check:
    """WSGI middleware: only requests signed with (access_key_id, secret) reach `app`."""

    def __init__(self, app: WsgiApp, access_key_id: str, secret: str, region: str) -> None:
        self.app, self.key_id, self.secret, self.region = app, access_key_id, secret, region
        self.seen: deque[dict[str, Any]] = deque(maxlen=5000)  # for tests: what clients sent

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in ("/_sim/health", "/_sim/requests"):
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps({"ok": True, "requests": list(self.seen)}).encode()]
        refusal = self.refusal(environ)
        self.seen.append({"method": environ.get("REQUEST_METHOD"), "uri": environ.get("REQUEST_URI", ""),
                          "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
                          "refused": refusal[0] if refusal else None})
        if refusal is None:
            if environ.get("REQUEST_METHOD") == "PUT" and "form" in str(environ.get("CONTENT_TYPE", "")):
                # S3 stores any body as is; moto's Flask would parse a form body away (urllib's
                # default Content-Type for data is application/x-www-form-urlencoded)
                environ["CONTENT_TYPE"] = "application/octet-stream"
            return self.app(environ, start_response)
        code, message = refusal
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>").encode()
        start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def refusal(self, environ: dict[str, Any]) -> tuple[str, str] | None:
        """(S3 error code, message) why the request is refused, or None: it is well signed."""
        raw_uri = str(environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ.get("PATH_INFO", "/"))
        path, _, raw_query = raw_uri.partition("?")
        pairs = _query_pairs(raw_query)
        query = dict(pairs)
        auth = _header(environ, "authorization")
        if "X-Amz-Signature" in query:
            credential, stamp = query.get("X-Amz-Credential", ""), query.get("X-Amz-Date", "")
            signed, given = query.get("X-Amz-SignedHeaders", ""), query["X-Amz-Signature"]
            payload = "UNSIGNED-PAYLOAD"
            pairs = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
            if query.get("X-Amz-Algorithm") != ALGORITHM:
                return "AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256"
            try:
                expires = int(query.get("X-Amz-Expires", ""))
            except ValueError:
                return "AuthorizationQueryParametersError", "X-Amz-Expires must be a number of seconds"
            if not 1 <= expires <= MAX_EXPIRES:
                return "AuthorizationQueryParametersError", "X-Amz-Expires must be between 1 and 604800"
            start = _amz_time(stamp)
            if start is None:
                return "AuthorizationQueryParametersError", "X-Amz-Date is not a valid date"
            if time.time() > start + expires:
                return "AccessDenied", "Request has expired"
        elif auth.startswith(ALGORITHM + " "):
            fields = dict(p.strip().partition("=")[::2] for p in auth[len(ALGORITHM) + 1:].split(","))
            credential, signed, given = fields.get("Credential", ""), fields.get("SignedHeaders", ""), fields.get("Signature", "")
            stamp = _header(environ, "x-amz-date")
            payload = _header(environ, "x-amz-content-sha256") or "UNSIGNED-PAYLOAD"
            start = _amz_time(stamp)
            if start is None or abs(time.time() - start) > CLOCK_SKEW:
                return "RequestTimeTooSkewed", "The difference between the request time and the current time is too large."
        else:
            return "AccessDenied", "Access Denied"
        key_id, _, scope = credential.partition("/")
        if key_id != self.key_id:
            return "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
        date, region, service, terminal = ([*scope.split("/"), "", "", "", ""])[:4]
        if region != self.region or service != "s3" or terminal != "aws4_request" or not stamp.startswith(date):
            return "AuthorizationHeaderMalformed", f"the credential scope must be <date>/{self.region}/s3/aws4_request"
        names = [n for n in signed.split(";") if n]
        if "host" not in names:
            return "AccessDenied", "the host header must be signed"
        canonical = "\n".join([
            str(environ.get("REQUEST_METHOD", "GET")),
            path or "/",
            "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted(pairs)),
            "".join(f"{n}:{' '.join(_header(environ, n).split())}\n" for n in names),
            signed,
            payload,
        ])
        to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        expected = hmac.new(signing_key(self.secret, date, region, service), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given):
            return "SignatureDoesNotMatch", ("The request signature we calculated does not match the signature "
                                             "you provided. Check your key and signing method.")
        return None


class S3Simulator:
    """moto S3 behind SigV4 checks, served from a thread (`start` returns its URL)."""

    def __init__(self, access_key_id: str = "", secret_access_key: str = "", region: str = "us-east-1",
                 buckets: Iterable[str] = ()) -> None:
        self.access_key_id = access_key_id or "AKIA" + secrets.token_hex(8).upper()
        self.secret_access_key = secret_access_key or secrets.token_urlsafe(30)
        self.region = region
        self.buckets = list(buckets)
        self.url = ""
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        app = SigV4Check(DomainDispatcherApplication(create_backend_app), self.access_key_id,
                         self.secret_access_key, self.region)
        self._server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="s3-sim")
        self._thread.start()
        if self.buckets:
            client = self.client()
            for bucket in self.buckets:
                client.create_bucket(Bucket=bucket)
        return self.url

    def client(self) -> Any:
        """A boto3 S3 client with this simulator's own credentials (for tests and set-up)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name=self.region,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None


def main(port: int, access_key_id: str | None, secret_access_key: str | None, region: str,
         buckets: list[str]) -> None:
    """`gpuhop sim s3`: serve until SIGTERM or Ctrl-C."""
    import signal

    sim = S3Simulator(access_key_id or "", secret_access_key or "", region, buckets)
    url = sim.start(port=port)
    shown = "" if secret_access_key else f" secret_access_key={sim.secret_access_key}"
    print(f"S3 simulator on {url} region={region} buckets={','.join(buckets)} "
          f"access_key_id={sim.access_key_id}{shown}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    sim.stop()
