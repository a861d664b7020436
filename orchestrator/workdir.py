"""A job's working directory as one deterministic, content-addressed archive.

It exists so that a job can be its code and not only an image: `gpuhop submit` packs the job's
directory (minus what `.gitignore`/`.gpuhopignore` exclude, and `.git/`; symlinks as `_link` says)
into a tar.gz whose bytes depend only on the files' names, contents and executable bits (sorted
entries, zero times and owners, a fixed gzip header), so the same tree always has the same sha256.
The daemon checks an uploaded archive with `inspect_archive` before storing it; the agent unpacks
it with its own stricter copy of those checks (orchestrator/agent.py must stay standard-library
and self-contained). Every refusal is a `WorkdirError` naming the path and what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import ignore

MB = 1024 * 1024
DEFAULT_MAX_BYTES = 50 * MB  # compressed; the daemon's [workdirs] max_mb
DEFAULT_MAX_UNPACKED = 1024 * MB  # what the archive may unpack to (a tar bomb stops here)
MAX_ENTRIES = 100_000
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class WorkdirError(Exception):
    """The directory or archive cannot be used; the message says which path and why."""


@dataclass
class Entry:
    path: str  # relative, '/'-separated
    kind: str  # "dir" | "file" | "link"
    size: int = 0
    executable: bool = False
    target: str = ""  # a link's target, relative to the link's directory


@dataclass
class Tree:
    root: Path
    entries: list[Entry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def biggest(self, count: int = 5) -> list[tuple[str, int]]:
        """The largest top-level entries (a directory counts all it holds): what to ignore first."""
        totals: dict[str, int] = {}
        for e in self.entries:
            top, sep, _ = e.path.partition("/")
            key = top + "/" if sep or e.kind == "dir" else top
            totals[key] = totals.get(key, 0) + e.size
        return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:count]


def human(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KB", "MB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GB"


def _check_name(rel: str) -> None:
    """Names the archive can carry to any machine unchanged: UTF-8 text, no control characters."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise WorkdirError(f"{shown!r}: the name is not valid UTF-8; rename it or add it to .gpuhopignore") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise WorkdirError(f"{rel!r}: the name holds a control character (newline, tab, ...); "
                           "rename it or add it to .gpuhopignore")


def scan(root: Path) -> Tree:
    """Every entry of `root` that is not ignored, sorted; WorkdirError for what cannot travel."""
    try:
        real_root = Path(os.path.realpath(root, strict=True))
    except OSError as exc:
        raise WorkdirError(f"{str(root)!r} does not exist or cannot be read ({exc.strerror})") from None
    if not real_root.is_dir():
        raise WorkdirError(f"{str(root)!r} is not a directory")
    tree = Tree(real_root)
    _scan_dir(tree, real_root, "", _enclosing_rules(real_root))
    return tree


def _enclosing_rules(root: Path) -> list[ignore.Rule]:
    """The ignore files above `root` up to its git repository's top, as git applies them (none
    when `root` is not inside a repository)."""
    above = [d for d in root.parents if not d.samefile(root)]
    top = next((i for i, d in enumerate(above) if (d / ".git").exists()), None)
    rules: list[ignore.Rule] = []
    for directory in reversed(above[:top + 1] if top is not None else []):
        with contextlib.suppress(WorkdirError):  # an unreadable file above the workdir is not ours to fix
            rules += _read_rules(directory, "", root.relative_to(directory).as_posix() + "/")
    return rules


def _read_rules(directory: Path, rel: str, prefix: str = "") -> list[ignore.Rule]:
    rules: list[ignore.Rule] = []
    for name in ignore.IGNORE_FILES:
        path = directory / name
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise WorkdirError(f"cannot read {rel + '/' if rel else ''}{name}: {exc.strerror}") from None
        rules += ignore.parse(text, rel, prefix)
    return rules


def _scan_dir(tree: Tree, directory: Path, rel: str, rules: list[ignore.Rule]) -> None:
    rules = rules + _read_rules(directory, rel)
    try:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it)
    except OSError as exc:
        raise WorkdirError(f"cannot list {rel or '.'}/: {exc.strerror}; fix its permissions or add it "
                           "to .gpuhopignore") from None
    for name in names:
        path = f"{rel}/{name}" if rel else name
        full = directory / name
        st = full.lstat()
        is_dir = stat.S_ISDIR(st.st_mode)
        if ignore.ignored(rules, path, is_dir):
            continue
        _check_name(path)
        if len(tree.entries) >= MAX_ENTRIES:
            raise WorkdirError(f"more than {MAX_ENTRIES} files; add the bulky directories to .gpuhopignore")
        if is_dir:
            tree.entries.append(Entry(path, "dir"))
            _scan_dir(tree, full, path, rules)
        elif stat.S_ISREG(st.st_mode):
            if not os.access(full, os.R_OK):
                raise WorkdirError(f"cannot read {path}: permission denied; fix its permissions or add it "
                                   "to .gpuhopignore")
            tree.entries.append(Entry(path, "file", st.st_size, bool(st.st_mode & 0o111)))
        elif stat.S_ISLNK(st.st_mode):
            tree.entries.append(_link(tree.root, directory, full, path))
        else:
            raise WorkdirError(f"{path} is not a regular file, directory or symlink (a FIFO, socket or "
                               "device); add it to .gpuhopignore")


def _link(root: Path, directory: Path, link: Path, rel: str) -> Entry:
    """A symlink inside the tree travels as a link (relative to its own directory); one to a file
    outside travels as that file (the job's machine could not follow it: examples/train.py is
    such a link); one to a directory outside, a loop or a dangling one is refused."""
    try:
        resolved = os.path.realpath(link, strict=True)
        st = os.stat(resolved)
    except OSError as exc:
        raise WorkdirError(f"symlink {rel} -> {os.readlink(link)!r} cannot be followed "
                           f"({exc.strerror or 'a loop'}); remove it or add it to .gpuhopignore") from None
    if resolved == str(root) or resolved.startswith(str(root) + os.sep):
        return Entry(rel, "link", target=os.path.relpath(resolved, directory))
    if not stat.S_ISREG(st.st_mode):
        raise WorkdirError(f"symlink {rel} points to {resolved}, outside the workdir and not a regular file; "
                           "copy what it points to into the workdir, or add it to .gpuhopignore")
    if not os.access(resolved, os.R_OK):
        raise WorkdirError(f"cannot read {rel} (-> {resolved}): permission denied; fix it or add it to .gpuhopignore")
    return Entry(rel, "file", st.st_size, bool(st.st_mode & 0o111))


class _Limited(io.RawIOBase):
    """A byte sink that refuses to grow past `limit` (the compressed size cap)."""

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.buf += data
        if len(self.buf) > self.limit:
            raise OverflowError
        return len(data)


def too_big_message(size: int, limit: int, tree: Tree | None) -> str:
    """What to tell the user: the size (at least `size` once packing stopped), the limit, and,
    from the tree when it is at hand, the biggest entries to leave out."""
    if tree is None:
        return f"the workdir archive is {human(size)}, over the limit of {human(limit)}"
    biggest = ", ".join(f"{name} {human(n)}" for name, n in tree.biggest())
    return (f"the workdir is over the limit of {human(limit)} compressed (packing stopped at {human(size)}; "
            f"{human(tree.size)} of files); the biggest entries to ignore in .gpuhopignore: {biggest}")


def build(tree: Tree, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The deterministic tar.gz of a scanned tree; WorkdirError past `max_bytes` compressed."""
    sink = _Limited(max_bytes)
    try:
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for e in tree.entries:
                info = tarfile.TarInfo(e.path)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if e.kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif e.kind == "link":
                    info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, e.target
                    tar.addfile(info)
                else:
                    info.mode = 0o755 if e.executable else 0o644
                    _add_file(tar, info, tree.root / e.path, e)
    except OverflowError:
        raise WorkdirError(too_big_message(len(sink.buf), max_bytes, tree)) from None
    return bytes(sink.buf)


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path, entry: Entry) -> None:
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                raise WorkdirError(f"{entry.path} changed while it was packed; try again")
            info.size = st.st_size
            tar.addfile(info, fh)
    except OSError as exc:
        raise WorkdirError(f"cannot read {entry.path}: {exc.strerror}; fix it or add it to .gpuhopignore") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, Tree]:
    """Scan and build: the archive and what went into it."""
    tree = scan(root)
    return build(tree, max_bytes), tree


def _unsafe(name: str) -> bool:
    parts = name.split("/")
    return name.startswith("/") or ".." in parts or "\x00" in name or not name.strip("/")


def inspect_archive(data: bytes, max_unpacked: int = DEFAULT_MAX_UNPACKED) -> int:
    """Check an uploaded archive without unpacking it: a gzip'd tar of directories, regular files
    and symlinks that stay inside, with safe names, at most `max_unpacked` bytes unpacked and
    MAX_ENTRIES entries. Sizes are checked from each header before its data is read, so a tar
    bomb is refused after reading at most `max_unpacked` bytes. Returns the unpacked size."""
    total = count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar:
                count += 1
                total += m.size
                if count > MAX_ENTRIES or total > max_unpacked:
                    raise WorkdirError(f"the archive unpacks to more than {human(max_unpacked)} or "
                                       f"{MAX_ENTRIES} entries")
                if _unsafe(m.name):
                    raise WorkdirError(f"archive entry {m.name[:200]!r} is an absolute path or climbs out with '..'")
                if m.issym() or m.islnk():
                    base = m.name.rpartition("/")[0] if m.issym() else ""
                    target = os.path.normpath(os.path.join(base, m.linkname))
                    if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
                        raise WorkdirError(f"archive link {m.name[:200]!r} points outside ({m.linkname[:200]!r})")
                elif not (m.isreg() or m.isdir()):
                    raise WorkdirError(f"archive entry {m.name[:200]!r} is a device, FIFO or other special file")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise WorkdirError(f"not a readable tar.gz archive ({exc})") from None
    return total

