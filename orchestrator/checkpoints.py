"""Checkpoint manifests of volumes synced through object storage: their shape, where each object
lives in the bucket, and the decisions about them, all pure (no I/O).

A volume's content is stored as content-addressed blobs (`<prefix>/volumes/<volume>/blobs/
<sha256>`) and manifests (`.../manifests/<seq>.json`, seq zero-padded so that key order is seq
order) that list every file with its blob. A manifest is written only after every blob it names
was seen in the bucket with its size, so each manifest is a complete checkpoint; restoring takes
the newest one whose blobs are all still there. Agents never hold a storage credential: the
daemon checks what they send with these functions and hands them presigned URLs.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT = 1
MAX_FILES = 100_000
MAX_PATH = 1024
SEQ_DIGITS = 12
AGENT_DIR = ".gpuhop"  # the agent's own markers in the volume: never synced
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MANIFEST_RE = re.compile(r"/manifests/(\d{" + str(SEQ_DIGITS) + r"})\.json$")


def check_path(path: str) -> str:
    """A file's path in the volume as a manifest holds it: relative, '/'-separated, no '.' or
    '..' part, not under the agent's own directory; else ValueError saying why."""
    if not path or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise ValueError(f"a path must be 1-{MAX_PATH} bytes")
    if "\x00" in path or "\\" in path or path.startswith("/"):
        raise ValueError(f"{path!r}: must be relative, '/'-separated, without NUL or backslash")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path!r}: empty, '.' or '..' part")
    if parts[0] == AGENT_DIR:
        raise ValueError(f"{path!r}: {AGENT_DIR}/ is the agent's own and is never synced")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{path!r}: not UTF-8") from None
    return path


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str
    sha256: str = Field(pattern=_SHA_RE.pattern)
    size: int = Field(ge=0, le=5 * 1024**4)  # S3's largest object
    mode: int = Field(default=0o644, ge=0, le=0o777)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_path(value)


def check_files(files: list[FileEntry]) -> list[FileEntry]:
    """The list, sorted by path, once no path is listed twice or is both a file and a directory."""
    ordered = sorted(files, key=lambda f: f.path)
    seen = {f.path for f in ordered}
    if len(seen) != len(ordered):
        raise ValueError("a path is listed twice")
    for f in ordered:
        for parent in PurePosixPath(f.path).parents:
            if str(parent) in seen:
                raise ValueError(f"{parent} is both a file and a directory")
    return ordered


class Manifest(BaseModel):
    """One complete checkpoint of a volume."""

    model_config = ConfigDict(extra="ignore")

    format: int = FORMAT
    volume: str
    seq: int = Field(ge=1, lt=10**SEQ_DIGITS)
    job_id: str
    attempt: int = Field(ge=0)
    created_at: float
    files: list[FileEntry] = Field(max_length=MAX_FILES)

    @model_validator(mode="after")
    def _files(self) -> Manifest:
        self.files = check_files(self.files)
        return self

    def blobs(self) -> dict[str, int]:
        """Every blob the manifest needs, with its size."""
        return {f.sha256: f.size for f in self.files}


def volume_root(prefix: str, volume: str) -> str:
    return f"{prefix.strip('/')}/volumes/{volume}/" if prefix.strip("/") else f"volumes/{volume}/"


def blob_key(prefix: str, volume: str, sha256: str) -> str:
    if not _SHA_RE.fullmatch(sha256):
        raise ValueError("not a sha256 in hex")
    return f"{volume_root(prefix, volume)}blobs/{sha256}"


def manifest_key(prefix: str, volume: str, seq: int) -> str:
    return f"{volume_root(prefix, volume)}manifests/{seq:0{SEQ_DIGITS}d}.json"


def manifests_prefix(prefix: str, volume: str) -> str:
    return f"{volume_root(prefix, volume)}manifests/"


def seqs_newest_first(keys: list[str]) -> list[int]:
    """The sequence numbers of the manifest keys among `keys`, newest first."""
    found = (_MANIFEST_RE.search(k) for k in keys)
    return sorted({int(m.group(1)) for m in found if m}, reverse=True)


def problems(needed: dict[str, int], stored: dict[str, int | None]) -> list[str]:
    """Why the blobs `needed` (sha256 -> size) are not all in the bucket as `stored` says
    (sha256 -> size, None = missing); empty when every one is there with its size."""
    out = []
    for sha, size in sorted(needed.items()):
        got = stored.get(sha)
        if got is None:
            out.append(f"blob {sha[:12]} is missing")
        elif got != size:
            out.append(f"blob {sha[:12]} holds {got} bytes, not {size}")
    return out


def commit_refusal(latest: Manifest | None, job_id: str, attempt: int) -> str | None:
    """Why attempt `attempt` of `job_id` may not commit a checkpoint on top of `latest`: a later
    attempt of the same job has already committed one (a machine that outlived its replacement
    must not write over the newer work). None: it may."""
    if latest is not None and latest.job_id == job_id and latest.attempt > attempt:
        return (f"attempt {latest.attempt} of this job already committed checkpoint {latest.seq}; "
                f"attempt {attempt} may not write over it")
    return None


def restore_plan(latest_seq: int | None, local_seq: int | None) -> bool:
    """Whether an attempt should restore the newest checkpoint into its volume: yes unless the
    volume itself holds that checkpoint or a newer state (it committed or restored it and its
    own writes since are newer still); an empty volume has no local seq."""
    return latest_seq is not None and (local_seq is None or local_seq < latest_seq)
