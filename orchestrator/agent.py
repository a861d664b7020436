"""The job agent: the small supervisor that wraps a job's command on the machine that runs it.

It exists because the daemon cannot see a process on a cloud machine (and must not be the parent
of one on the local machine, so that jobs outlive daemon restarts). It runs the job as a child in
its own process group (as another user with `--user`), forwards SIGTERM (a preemption notice or
a stop) to it, and reports what happened in four places, so that at least one survives any
single failure:

* files in `--dir` (local provider): `agent.pid`, `job.pid`, `started_at`, and `exit.json`;
* `$GPUHOP_VOLUME/.gpuhop/<attempt name>.exit` (every provider), read after a relaunch;
* one `gpuhop-exit: {...}` line on its stdout (on EC2 that is the console output);
* HTTP reports to `$GPUHOP_CALLBACK_URL` (space-separated, one per daemon replica: a failed
  post moves to the next) with the per-attempt `$GPUHOP_TOKEN` (start,
  heartbeats carrying new log output, an interruption notice, and the exit code). Every line of
  output is shipped before the exit report, which is retried with backoff until the daemon
  acknowledges it (2xx, or 410: the attempt has already ended) or GPUHOP_EXIT_REPORT_MAX
  seconds have passed; heartbeats go on meanwhile, and while the agent lingers.

With GPUHOP_SYNC_SECONDS set (`[volume] sync = "object-store"`), the volume is restored from the
daemon's object storage before the job starts and uploaded every that many seconds and once more
after the job ends (`Syncer`), through presigned URLs the daemon hands out: the agent never holds
a storage credential.

The job sees only GPUHOP_JOB_ID, GPUHOP_ATTEMPT and GPUHOP_VOLUME of gpuhop's variables: never
the token, the callback URL or the agent's own settings. Standard library only: on a cloud it
is shipped inside the launch request (`cloud_bootstrap`) and runs with the image's `python3`.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEARTBEAT_SECONDS = float(os.environ.get("GPUHOP_HEARTBEAT", "10"))
EXIT_REPORT_MAX = float(os.environ.get("GPUHOP_EXIT_REPORT_MAX", "3600"))
RETRY_FIRST = float(os.environ.get("GPUHOP_REPORT_RETRY", "1"))  # doubles up to RETRY_CAP
RETRY_CAP = 30.0
MAX_LOG_CHUNK = 256 * 1024
# gpuhop's variables a job may see; every other GPUHOP_* is the agent's own (token, URL, ...)
JOB_VARS = frozenset({"GPUHOP_JOB_ID", "GPUHOP_ATTEMPT", "GPUHOP_VOLUME", "GPUHOP_LOCAL_INSTANCE"})
OK, GONE, REFUSED, FAILED = "ok", "gone", "refused", "failed"  # what a report got

BOOTSTRAP_ARGV = [
    "python3",
    "-c",
    'import base64,os,zlib;exec(compile(zlib.decompress(base64.b64decode(os.environ["GPUHOP_AGENT_B64"])),"gpuhop-agent","exec"))',
]
BOOTSTRAP_SHELL = shlex.join(BOOTSTRAP_ARGV)  # the same, as one /bin/sh command line


def cloud_bootstrap(command: list[str]) -> tuple[str, dict[str, str]]:
    """What a cloud adapter runs instead of the job's command: a fixed shell line (no user text
    in it) plus two environment variables carrying the agent's source and the job's command as
    JSON. The line holds double quotes: escape it for the provider's wire format. The source
    travels zlib-compressed (EC2 user data is limited to 16 KB)."""
    env = {
        "GPUHOP_AGENT_B64": _shipped_source(),
        "GPUHOP_COMMAND": json.dumps(command),
    }
    return BOOTSTRAP_SHELL, env


@functools.lru_cache(maxsize=1)
def _shipped_source() -> str:
    """This file as it travels: docstrings and comments dropped (ast), zlib, base64. EC2 user
    data holds 16 KB, and the agent grows with each capability; the code that runs is the same."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return base64.b64encode(zlib.compress(ast.unparse(tree).encode("utf-8"), 9)).decode("ascii")


def job_environment(env: dict[str, str]) -> dict[str, str]:
    """The job's environment: the agent's minus gpuhop's variables that are not for the job."""
    return {k: v for k, v in env.items() if not k.startswith("GPUHOP_") or k in JOB_VARS}


def _write_json_atomic(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data))
    os.replace(tmp, path)


def _libc() -> object | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except Exception:  # not Linux, no libc: no parent-death signal
        return None


def child_setup(libc: object | None, parent: int, sig: int = 9) -> None:
    """Runs in the job's process between fork and exec, after the uid change (a uid change
    clears the parent-death signal, so it is set last): the job is SIGKILLed when the agent
    dies. If the agent died before that (the child was re-parented), the job never starts."""
    prctl = getattr(libc, "prctl", None)
    if prctl is not None:
        prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL: no capability reaches the job
        prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(137)


def _utf8_cut(data: bytes) -> bytes:
    """`data` without a multi-byte character cut off at its end (it goes with the next chunk)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # an ASCII byte or the lead byte of a sequence
            need = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if need <= back or back == len(data) else data[:-back]
    return data


class Reporter:
    """Posts reports to the daemon; never raises, never blocks the job."""

    def __init__(self, url: str, token: str, name: str, log_path: Path | None) -> None:
        # one URL per daemon replica, the launching one first: on a failed post the next one
        # is tried (each replica records reports alike in the shared database)
        self.urls = url.split() or [""]
        self.url = self.urls[0]
        self.token = token
        self.name = name
        self.log_path = log_path
        self.log_offset = 0
        self.gone = False  # the daemon answered 410: this attempt has ended, stop reporting
        self.lock = threading.Lock()

    def post(self, event: str, **fields: object) -> str:
        if not self.url:
            return OK
        with self.lock:
            if self.gone:
                return GONE
            body: dict[str, object] = {"attempt": self.name, "event": event, **fields}
            chunk = self._next_log_chunk()
            if chunk:
                body["log_offset"] = self.log_offset
                # byte-exact: bytes that are not UTF-8 travel as U+DC80-U+DCFF, so the daemon's
                # file grows by exactly len(chunk) and the offsets stay in step
                body["log"] = chunk.decode("utf-8", "surrogateescape")
            req = urllib.request.Request(
                self.url,
                data=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                         "X-Gpuhop-Attempt": self.name},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    self._learn_urls(resp.read(65536))
            except urllib.error.HTTPError as exc:
                answer = b""
                with contextlib.suppress(OSError):
                    answer = exc.read(4096)
                exc.close()
                if exc.code == 410:
                    self.gone = True
                    return GONE
                if exc.code == 409 and self._resume_at(answer):
                    return FAILED  # retried at once from where the daemon's copy ends
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    return REFUSED
                self._next_url()
                return FAILED
            except (urllib.error.URLError, OSError, ValueError):
                self._next_url()
                return FAILED
            self.log_offset += len(chunk)
            return OK

    def _learn_urls(self, answer: bytes) -> None:
        """The acknowledgement lists the live replicas: fail over along that list from now on
        (kept as it was when the answer holds none, or nothing that looks like a URL)."""
        try:
            urls = json.loads(answer.decode("utf-8")).get("report_urls")
        except (ValueError, AttributeError):
            return
        if not isinstance(urls, list):
            return
        good = [u for u in urls[:16] if isinstance(u, str) and u.startswith(("http://", "https://"))
                and len(u) < 2048 and not any(c.isspace() for c in u)]
        if good:
            self.urls = [self.url, *[u for u in good if u != self.url]]

    def _next_url(self) -> None:
        """This replica did not answer: the next report goes to the next one."""
        self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]

    def _resume_at(self, answer: bytes) -> bool:
        """A 409 names the size of the daemon's copy of the log: send from there on."""
        try:
            offset = int(json.loads(answer.decode("utf-8"))["expected_offset"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return False
        if offset < 0:
            return False
        self.log_offset = offset
        return True

    def unsent(self) -> int:
        try:
            size = self.log_path.stat().st_size if self.log_path else 0
        except OSError:
            return 0
        return size - self.log_offset

    def _next_log_chunk(self) -> bytes:
        if self.log_path is None or self.unsent() <= 0:
            return b""
        with open(self.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            return _utf8_cut(fh.read(MAX_LOG_CHUNK))


def deliver_exit(reporter: Reporter, result: dict[str, object], max_seconds: float) -> str:
    """Ship every byte of output, then the exit report; retry with backoff (RETRY_FIRST doubling
    to RETRY_CAP) until the daemon acknowledges, refuses for good, or `max_seconds` pass."""
    deadline = time.monotonic() + max_seconds
    delay = RETRY_FIRST
    while True:
        status = OK
        while status == OK and reporter.url and reporter.unsent() > 0:
            status = reporter.post("heartbeat")
        if status == OK:
            status = reporter.post("exit", **result)
        if status != FAILED:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return FAILED
        time.sleep(min(delay, left))
        delay = min(delay * 2, RETRY_CAP)


def _seconds_left(notice: dict[str, object]) -> float | None:
    """Seconds until the reclaim in a notice such as {"action": "terminate", "time": "...Z"}."""
    from datetime import datetime

    try:
        deadline = datetime.fromisoformat(str(notice.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return deadline.timestamp() - time.time()


class MetadataReader:
    """Reads one instance-metadata URL the IMDSv2 way, as instances launched with
    HttpTokens=required demand (a tokenless read gets 401): a session token from
    PUT <base>/latest/api/token (header X-aws-ec2-metadata-token-ttl-seconds), sent as
    X-aws-ec2-metadata-token with every read and renewed before it expires; a 401 drops it.
    Where no token can be had (a metadata service without IMDSv2) reads go without one."""

    def __init__(self, url: str, ttl: int = 21600) -> None:
        self.url = url
        base, sep, _ = url.partition("/latest/")
        self.token_url = f"{base}/latest/api/token" if sep else ""
        self.ttl = max(1, min(21600, ttl))
        self.token = ""
        self.renew_at = 0.0

    def _token(self) -> str:
        if (self.token and time.monotonic() < self.renew_at) or not self.token_url:
            return self.token
        request = urllib.request.Request(
            self.token_url, method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.ttl)}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                self.token = resp.read().decode("ascii", "replace").strip()
            self.renew_at = time.monotonic() + self.ttl - min(60.0, self.ttl / 2)
        except (urllib.error.URLError, OSError, ValueError):
            self.token = ""
        return self.token

    def read(self) -> bytes | None:
        """The item's body, or None (none yet: 404; refused, unreachable)."""
        token = self._token()
        request = urllib.request.Request(self.url, headers={"X-aws-ec2-metadata-token": token} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                body: bytes = resp.read()
                return body
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                self.token = ""  # expired or unknown: a new one next time
            return None
        except (urllib.error.URLError, OSError, ValueError):
            return None


def _watch_metadata(url: str, reporter: Reporter, stop: threading.Event, on_notice: Callable[[], None]) -> None:
    """Poll the cloud's instance metadata for a spot interruption notice. Report it at once (the
    daemon starts the replacement), but let the job keep working: the daemon stops this machine
    when the replacement is ready, and only if that has not happened when little of the notice
    is left does the agent tell the job to checkpoint (SIGTERM) itself."""
    poll = float(os.environ.get("GPUHOP_METADATA_POLL", "2"))
    margin = float(os.environ.get("GPUHOP_CHECKPOINT_MARGIN", "30"))
    reader = MetadataReader(url, int(os.environ.get("GPUHOP_METADATA_TOKEN_TTL", "21600")))
    while not stop.wait(poll):
        body = reader.read()
        try:
            notice = json.loads(body or b"{}")
        except ValueError:
            continue
        if isinstance(notice, dict) and notice.get("action"):
            reporter.post("interruption", notice=notice)
            left = _seconds_left(notice)
            if left is not None and left > 0:
                stop.wait(max(0.0, left - min(margin, left / 2)))
            if not stop.is_set():
                on_notice()
            return


def _sha256(path: Path, copy_to: Path | None = None) -> str:
    """The file's sha256, copying it to `copy_to` on the way when given."""
    digest = hashlib.sha256()
    with open(path, "rb") as src, (open(copy_to, "wb") if copy_to else contextlib.nullcontext()) as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            if dst:
                dst.write(chunk)
    return digest.hexdigest()


class Syncer:
    """Keeps `$GPUHOP_VOLUME` in step with the daemon's object storage (checkpoint sync): restores
    the newest complete checkpoint before the job starts, and uploads the volume as a checkpoint
    when it changed. A checkpoint is a snapshot taken while no file changed: every file is copied
    (or known unchanged by size, mtime and inode) between two scans that must agree, else it is
    taken again; copies are hashed, the blobs the store lacks are PUT, then the daemon commits the
    manifest. `.gpuhop/` (the agent's own) is never synced."""

    def __init__(self, reporter: Reporter, volume: str) -> None:
        self.r, self.vol = reporter, Path(volume)
        self.dir = self.vol / ".gpuhop"
        self.lock = threading.Lock()

    def _post(self, what: str, body: dict[str, object]) -> Any:
        url = self.r.url.rsplit("/v1/agent/", 1)[0] + "/v1/agent/sync/" + what
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
            "Authorization": f"Bearer {self.r.token}", "Content-Type": "application/json",
            "X-Gpuhop-Attempt": self.r.name})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            exc.close()
        except (urllib.error.URLError, OSError, ValueError):
            self.r._next_url()
        return None

    def _state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.dir / "sync.json").read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    def _files(self) -> dict[str, os.stat_result]:
        found = {}
        for root, dirs, names in os.walk(self.vol):
            rel = os.path.relpath(root, self.vol)
            if rel == ".":
                dirs[:] = [d for d in dirs if d != ".gpuhop"]
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(root, name))
                    if stat.S_ISREG(st.st_mode):
                        found[os.path.normpath(os.path.join(rel, name))] = st
        return found

    def restore(self) -> bool:
        """Bring the volume to the newest complete checkpoint (unless it holds it or newer)."""
        ans = self._post("restore", {"local_seq": self._state().get("seq")})
        if not isinstance(ans, dict):
            return False
        if not ans.get("restore"):
            return True
        files = {f["path"]: f for f in ans["files"]}
        if any(p.startswith("/") or ".." in p.split("/") or p.split("/")[0] == ".gpuhop" for p in files):
            return False
        for path in self._files():
            if path not in files:
                os.unlink(self.vol / path)  # the checkpoint's state exactly
        tmp = self.dir / "restore.tmp"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, f in files.items():
            dest = self.vol / path
            if dest.is_file() and not dest.is_symlink() and _sha256(dest) == f["sha256"]:
                continue
            digest = hashlib.sha256()
            with urllib.request.urlopen(f["url"], timeout=60) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != f["sha256"] or tmp.stat().st_size != f["size"]:
                return False
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, f["mode"])
            os.replace(tmp, dest)
        cache, done = {}, []  # as if this volume had committed the checkpoint: nothing to hash or send again
        for path, f in sorted(files.items()):
            st = os.lstat(self.vol / path)
            cache[path] = [st.st_size, st.st_mtime_ns, st.st_ino, f["sha256"]]
            done.append({"path": path, "sha256": f["sha256"], "size": f["size"], "mode": st.st_mode & 0o777})
        _write_json_atomic(self.dir / "sync.json", {"seq": ans["seq"], "files": cache, "committed": done})
        return True

    def upload(self) -> bool:
        """Upload the volume as a new checkpoint if it changed; False: not this time."""
        with self.lock:
            state = self._state()
            known = state.get("files", {})
            stage = self.dir / "stage"
            for _ in range(5):
                shutil.rmtree(stage, ignore_errors=True)
                stage.mkdir(mode=0o700, parents=True, exist_ok=True)
                before, entries, staged, cache = self._files(), [], {}, {}  # type: ignore[var-annotated]
                try:
                    for path, st in sorted(before.items()):
                        key = [st.st_size, st.st_mtime_ns, st.st_ino]
                        sha = known[path][3] if known.get(path, [])[:3] == key else ""
                        if not sha:
                            sha = _sha256(self.vol / path, stage / "copy")
                            os.replace(stage / "copy", stage / sha)
                            staged[sha] = stage / sha
                        cache[path] = [*key, sha]
                        entries.append({"path": path, "sha256": sha, "size": st.st_size, "mode": st.st_mode & 0o777})
                except OSError:
                    continue  # a file went away while read
                if {p: cache[p][:3] for p in cache} == {
                        p: [s.st_size, s.st_mtime_ns, s.st_ino] for p, s in self._files().items()}:
                    break
                time.sleep(0.05)
            else:
                return False  # kept changing: next time
            if state.get("committed") == entries:
                return True
            blobs = sorted({e["sha256"]: e["size"] for e in entries}.items())
            for i in range(0, len(blobs), 500):  # URLs asked for just before use: they expire
                ans = self._post("upload", {"blobs": [{"sha256": h, "size": n} for h, n in blobs[i:i + 500]]})
                if not isinstance(ans, dict):
                    return False
                for item in ans["upload"]:
                    blob = staged.get(item["sha256"])
                    if blob is None:  # known unchanged, yet not stored: read it again now
                        again = next(str(e["path"]) for e in entries if e["sha256"] == item["sha256"])
                        blob = stage / item["sha256"]
                        if _sha256(self.vol / again, blob) != item["sha256"]:
                            return False
                    with open(blob, "rb") as fh:
                        req = urllib.request.Request(item["url"], data=fh, method="PUT", headers={
                            "Content-Length": str(blob.stat().st_size), "Content-Type": "application/octet-stream"})
                        try:
                            urllib.request.urlopen(req, timeout=300).close()
                        except (urllib.error.URLError, OSError, ValueError):
                            return False
            ans = self._post("commit", {"files": entries})
            shutil.rmtree(stage, ignore_errors=True)
            if not isinstance(ans, dict):
                return False
            _write_json_atomic(self.dir / "sync.json", {"seq": ans["seq"], "files": cache, "committed": entries})
            return True

    def every(self, seconds: float, stop: threading.Event) -> None:
        while not stop.wait(seconds):
            _ok(self.upload)


def _ok(action: Callable[[], bool]) -> bool:
    try:
        return action()
    except Exception:  # a sync that failed is tried again later; it never stops the job
        return False


def _as_user(ids: tuple[int, int] | None, action: Callable[[], None]) -> None:
    """Run `action` with the job's uid/gid (in a forked child) when the job runs as another
    user: its volume is its own, and a root agent must not follow the links a job put there."""
    if ids is None or os.geteuid() == ids[0]:
        with contextlib.suppress(OSError):
            action()
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
            action()
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def _write_marker(volume: str, name: str, result: dict[str, object]) -> None:
    marker = Path(volume) / ".gpuhop"
    marker.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_json_atomic(marker / f"{name or 'attempt'}.exit", result)


class StoppedEarly(Exception):
    """A stop or a reclaim notice while the workdir was being fetched (not an OSError: urllib
    would take it for a network failure and try again)."""


def fetch_workdir(reporter: Reporter, sha: str, max_seconds: float) -> bytes:
    """The job's working directory (tar.gz) from the daemon, with the attempt's token, checked
    against the sha256 the launch named. A daemon that cannot be reached is tried again (next
    replica, backoff) for `max_seconds`; a refusal or a wrong archive is final (OSError)."""
    if not reporter.url:
        raise OSError(f"workdir {sha[:12]}: no daemon URL to fetch it from (GPUHOP_CALLBACK_URL)")
    deadline, delay = time.monotonic() + max_seconds, RETRY_FIRST
    while True:
        url = reporter.url.rpartition("/v1/agent/")[0] + "/v1/agent/workdir"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {reporter.token}",
                                                   "X-Gpuhop-Attempt": reporter.name})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                data: bytes = resp.read()
            if hashlib.sha256(data).hexdigest() != sha:
                raise OSError(f"workdir {sha[:12]}: the archive fetched has another sha256; not used")
            return data
        except urllib.error.HTTPError as exc:
            exc.close()
            why = f"the daemon answered {exc.code}"
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise OSError(f"workdir {sha[:12]}: {why}") from None
        except (urllib.error.URLError, ValueError, TimeoutError, ConnectionError) as exc:
            why = str(exc)
        reporter._next_url()
        if time.monotonic() + delay > deadline:
            raise OSError(f"workdir {sha[:12]}: cannot fetch it from the daemon ({why})")
        time.sleep(delay)
        delay = min(delay * 2, RETRY_CAP)


def unpack_workdir(data: bytes, dest: str, limit: int) -> None:
    """Unpack into the empty directory `dest`, refusing (OSError, `dest` left empty) absolute or
    '..' names, links that resolve outside `dest`, devices and FIFOs, and more than `limit`
    bytes (checked from each header before its data is read). Files never follow a link: links
    are made last, then every one is resolved again."""
    import io
    import tarfile

    links, total = [], 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for count, m in enumerate(tar):
                total += m.size
                if count >= 100000 or total > limit:
                    raise OSError(f"the archive unpacks to more than {limit} bytes or 100000 entries")
                if m.name.startswith("/") or ".." in m.name.split("/") or "\0" in m.name:
                    raise OSError(f"archive entry {m.name[:200]!r} is absolute or climbs out with '..'")
                path = os.path.join(dest, m.name)
                if m.isdir():
                    os.makedirs(path, 0o755, exist_ok=True)
                elif m.isreg() and not m.issparse():
                    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o755 if m.mode & 0o111 else 0o644)
                    with os.fdopen(fd, "wb") as out, tar.extractfile(m) as src:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, out)
                elif m.issym() or m.islnk():
                    links.append(m)
                else:
                    raise OSError(f"archive entry {m.name[:200]!r} is a device, FIFO or other special file")
        for m in links:
            path = os.path.join(dest, m.name)
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            if m.issym():
                os.symlink(m.linkname, path)
            else:
                os.link(os.path.join(dest, m.linkname), path, follow_symlinks=False)
        for m in links:
            real = os.path.realpath(os.path.join(dest, m.name if m.issym() else m.linkname))
            if real != dest and not real.startswith(dest + os.sep):
                raise OSError(f"archive link {m.name[:200]!r} points outside the working directory")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        for entry in os.listdir(dest):  # nothing half-unpacked is left for the job to run in
            target = os.path.join(dest, entry)
            shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.unlink(target)
        raise OSError(f"workdir: {exc}") from None


def prepare_workdir(env: dict[str, str], reporter: Reporter, ids: tuple[int, int] | None) -> str | None:
    """A fresh directory holding the job's working directory, or None when the job has none: a
    new temporary one, or GPUHOP_WORKDIR_PATH (the local provider's containers mount it)."""
    sha = env.get("GPUHOP_WORKDIR", "")
    if not sha:
        return None
    data = fetch_workdir(reporter, sha, float(env.get("GPUHOP_EXIT_REPORT_MAX", EXIT_REPORT_MAX)))
    fixed = env.get("GPUHOP_WORKDIR_PATH", "")
    if fixed:
        os.mkdir(fixed, 0o700)  # never one that exists: it would not be fresh
    dest = os.path.realpath(fixed or tempfile.mkdtemp(prefix="gpuhop-workdir-"))
    try:
        unpack_workdir(data, dest, int(env.get("GPUHOP_WORKDIR_MAX", str(2**30))))
    except OSError:
        os.rmdir(dest)
        raise
    if ids is not None and os.geteuid() == 0:  # the job runs as its own uid: the tree is its own
        for top, dirs, files in os.walk(dest):
            for entry in [*dirs, *files]:
                os.lchown(os.path.join(top, entry), ids[0], ids[1])
        os.chown(dest, ids[0], ids[1])
    return dest


def run(
    command: list[str],
    state_dir: Path | None,
    log_path: Path | None,
    user: tuple[int, int, list[int]] | None = None,
    marker_user: tuple[int, int] | None = None,
) -> int:
    env = dict(os.environ)
    name = env.get("GPUHOP_ATTEMPT_NAME", "")
    reporter = Reporter(env.get("GPUHOP_CALLBACK_URL", ""), env.get("GPUHOP_TOKEN", ""), name, log_path)
    agent_done = threading.Event()

    def finish(result: dict[str, object]) -> None:
        """Tell every place what happened, the daemon last (it may take long), then linger."""
        line = {"attempt": name, "exit_code": result["exit_code"], "exit_signal": result["signal"],
                "sigterm": result.get("sigterm_received", False)}
        with contextlib.suppress(OSError, ValueError):
            print("gpuhop-exit: " + json.dumps(line), flush=True)
        vol = env.get("GPUHOP_VOLUME", "")
        if vol:
            _as_user(marker_user or (user[:2] if user else None), lambda: _write_marker(vol, name, result))
        if state_dir:
            _write_json_atomic(state_dir / "exit.json", result)
        deliver_exit(reporter, result, float(env.get("GPUHOP_EXIT_REPORT_MAX", EXIT_REPORT_MAX)))
        if env.get("GPUHOP_LINGER") == "1":
            # Providers such as RunPod restart a container whose main process exits, which would
            # run the job again. Stay up, idle and heartbeating, until the daemon ends the machine.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            while True:
                time.sleep(3600)
        agent_done.set()

    def heartbeat() -> None:  # until the agent itself ends: also while it reports the exit
        while not agent_done.wait(HEARTBEAT_SECONDS):
            if reporter.post("heartbeat") == GONE:
                return

    stop_requested = threading.Event()
    foreign_sigterm = threading.Event()  # a SIGTERM gpuhop did not ask for: a reclaim notice
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path else None
    sync_every, vol = float(env.get("GPUHOP_SYNC_SECONDS") or 0), env.get("GPUHOP_VOLUME", "")
    # a job run as another user (local provider) is not synced: a root agent must not read its files
    syncer = Syncer(reporter, vol) if sync_every > 0 and vol and reporter.url and not (user or marker_user) else None
    term_by: list[float] = []  # when the final sync must be done: SIGKILL follows a notice

    def say(text: str) -> None:
        if log_path is not None:
            with open(log_path, "a") as fh:
                fh.write(f"gpuhop-agent: {text}\n")
    libc, parent, kill = _libc(), os.getpid(), int(signal.SIGKILL)
    ids: dict[str, Any] = {}
    if user is not None:  # Python >= 3.9; only the local provider asks for it
        ids = {"user": user[0], "group": user[1], "extra_groups": user[2]}
    # signals are handled from before the job exists: one that arrives while it starts is
    # remembered and forwarded, never the default action that would kill the agent alone
    started: list[subprocess.Popen[bytes]] = []
    early: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGTERM:
            term_by.append(time.monotonic() + float(env.get("GPUHOP_NOTICE_SECONDS", "5")))
            if state_dir and (state_dir / "stop-requested").exists():
                stop_requested.set()
            else:
                foreign_sigterm.set()
        if not started:
            early.append(signum)
            if fetching:  # stop waiting for the workdir: the job is being stopped before it starts
                raise StoppedEarly(f"signal {signum} before the job started")
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(started[0].pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    workdir: str | None = None
    fetching: list[bool] = []  # set while the workdir is fetched: a signal then stops the wait
    if syncer is not None:  # the newest complete checkpoint first, or the job does not start
        threading.Thread(target=heartbeat, daemon=True).start()  # a long restore is not silence
        give_up, delay = time.monotonic() + float(env.get("GPUHOP_RESTORE_MAX", "300")), RETRY_FIRST
        while not _ok(syncer.restore):
            if time.monotonic() > give_up:
                say("could not restore the volume's checkpoint from object storage; the job was not started")
                now = time.time()
                finish({"exit_code": 75, "signal": None, "stopped_by_us": False, "started_at": now,
                        "ended_at": now, "error": "checkpoint restore failed"})
                return 75
            time.sleep(delay)
            delay = min(delay * 2, RETRY_CAP)
        seq = syncer._state().get("seq")
        say(f"volume at checkpoint {seq}" if seq else "no checkpoint in object storage yet")
    fetching.append(True)
    try:
        workdir = prepare_workdir(env, reporter, (user[0], user[1]) if user else marker_user)
        fetching.clear()
        child = subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            env=job_environment(env),
            start_new_session=True,
            preexec_fn=lambda: child_setup(libc, parent, kill),
            **ids,
        )
    except (OSError, StoppedEarly) as exc:  # the program could not be started: report it as exit 127
        fetching.clear()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if out is not None:
            os.write(out, f"gpuhop-agent: cannot start {command[0]!r}: {exc}\n".encode())
            os.close(out)
        now = time.time()
        code = 128 + early[0] if early else 127
        finish({"exit_code": code, "signal": None, "stopped_by_us": stop_requested.is_set(),
                "sigterm_received": foreign_sigterm.is_set(), "started_at": now, "ended_at": now, "error": str(exc)})
        return code
    started_at = time.time()
    if out is not None:
        os.close(out)
    if state_dir:
        (state_dir / "job.pid").write_text(str(child.pid))
        (state_dir / "started_at").write_text(repr(started_at))
    started.append(child)
    for signum in early:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)

    def notice_received() -> None:
        """A reclaim notice seen from inside the machine: tell the job to checkpoint now."""
        foreign_sigterm.set()
        term_by.append(time.monotonic() + float(env.get("GPUHOP_CHECKPOINT_MARGIN", "30")))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGTERM)

    job_done = threading.Event()
    reporter.post("start", pid=child.pid)
    if syncer is None:
        threading.Thread(target=heartbeat, daemon=True).start()
    metadata_url = env.get("GPUHOP_METADATA_URL", "")
    if metadata_url:
        threading.Thread(
            target=_watch_metadata, args=(metadata_url, reporter, job_done, notice_received), daemon=True
        ).start()

    if syncer is not None:
        threading.Thread(target=syncer.every, args=(sync_every, job_done), daemon=True).start()
    code = child.wait()
    job_done.set()
    if syncer is not None:  # the job's last checkpoint, before SIGKILL if a notice came
        final = threading.Thread(target=_ok, args=(syncer.upload,), daemon=True)
        final.start()
        final.join(max(0.0, min(term_by) - time.monotonic() - 1) if term_by else None)
        say(f"volume at checkpoint {syncer._state().get('seq')}")
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if stop_requested.is_set() or (state_dir and (state_dir / "stop-requested").exists()):
        stop_requested.set()
    finish({
        "exit_code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "stopped_by_us": stop_requested.is_set(),
        "sigterm_received": foreign_sigterm.is_set() and not stop_requested.is_set(),
        "started_at": started_at,
        "ended_at": time.time(),
    })
    return code if code >= 0 else 128 + (-code)


def _daemonize() -> None:
    """Detach (double fork) so the launching daemon is not our parent: jobs outlive it."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)


def _ids(text: str) -> tuple[int, int, list[int]]:
    """'UID:GID[:G1,G2]' -> (uid, gid, supplementary gids)."""
    parts = text.split(":")
    groups = [int(g) for g in parts[2].split(",") if g] if len(parts) > 2 else []
    return int(parts[0]), int(parts[1]), groups


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    state_dir: Path | None = None
    log_path: Path | None = None
    user: tuple[int, int, list[int]] | None = None
    marker_user: tuple[int, int] | None = None
    daemonize = False
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--":
            break
        if flag == "--dir":
            state_dir = Path(args.pop(0))
        elif flag == "--log":
            log_path = Path(args.pop(0))
        elif flag == "--user":  # run the job as UID:GID[:GROUPS] (the agent stays who it is)
            user = _ids(args.pop(0))
        elif flag == "--marker-user":  # write the volume's exit marker as UID:GID
            marker_user = _ids(args.pop(0))[:2]
        elif flag == "--daemonize":
            daemonize = True
        else:
            print(f"gpuhop-agent: unknown option {flag}", file=sys.stderr)
            return 2
    command = args or json.loads(os.environ.get("GPUHOP_COMMAND", "[]"))
    if not command:
        print("gpuhop-agent: no command (give it after -- or in GPUHOP_COMMAND)", file=sys.stderr)
        return 2
    if log_path is None and os.environ.get("GPUHOP_CALLBACK_URL"):
        # on a cloud the daemon sees the output only through our reports: keep it in a private
        # file (0600, a name nobody can guess or plant first)
        fd, path = tempfile.mkstemp(prefix="gpuhop-", suffix=".log")
        os.close(fd)
        log_path = Path(path)
    if daemonize:
        _daemonize()
    if state_dir:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (state_dir / "agent.pid").write_text(str(os.getpid()))
    return run(command, state_dir, log_path, user, marker_user)


if __name__ == "__main__":
    sys.exit(main())
