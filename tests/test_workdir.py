"""A job's working directory (orchestrator.ignore, orchestrator.workdir, the agent's unpacking):
gitignore patterns as a table, the archive's determinism, every kind of tree that cannot travel
refused with its path named, and every unsafe archive refused by the daemon's check and by the
agent, which leaves nothing unpacked. Real files, real tar.gz bytes; no mocks."""

from __future__ import annotations

import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest

from adapters.local import container_argv
from orchestrator import agent, ignore, workdir
from orchestrator.workdir import WorkdirError

# (patterns, path, is_dir, ignored?)
CASES = [
    ("*.log", "a.log", False, True),
    ("*.log", "deep/down/a.log", False, True),  # no slash: any depth
    ("*.log", "a.logx", False, False),
    ("# comment\n\n*.pyc", "# comment", False, False),
    ("\\#keep", "#keep", False, True),
    ("build/", "build", True, True),
    ("build/", "build", False, False),  # directories only
    ("build/", "src/build", True, True),
    ("/build", "build", True, True),  # anchored
    ("/build", "src/build", True, False),
    ("doc/*.txt", "doc/a.txt", False, True),  # a middle slash anchors too
    ("doc/*.txt", "x/doc/a.txt", False, False),
    ("doc/*.txt", "doc/sub/a.txt", False, False),  # * never crosses /
    ("**/foo", "a/b/foo", False, True),
    ("**/foo", "foo", False, True),
    ("a/**/b", "a/b", False, True),
    ("a/**/b", "a/x/y/b", False, True),
    ("a/**", "a/x/y", False, True),
    ("a/**", "a", True, False),
    ("?.txt", "a.txt", False, True),
    ("?.txt", "ab.txt", False, False),
    ("[ab].txt", "b.txt", False, True),
    ("[!ab].txt", "b.txt", False, False),
    ("*.log\n!keep.log", "keep.log", False, False),  # negation: the last match wins
    ("!keep.log\n*.log", "keep.log", False, True),
    ("data\n!data/x", "data", True, True),
    ("", ".git", True, True),  # always
    ("", "sub/.git", True, True),
    ("trailing   ", "trailing", False, True),  # unescaped trailing spaces are dropped
]


@pytest.mark.parametrize(("patterns", "path", "is_dir", "expected"), CASES)
def test_ignore_patterns(patterns: str, path: str, is_dir: bool, expected: bool) -> None:
    assert ignore.ignored(ignore.parse(patterns), path, is_dir) is expected


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def paths(root: Path) -> list[str]:
    return [e.path for e in workdir.scan(root).entries]


def test_nested_ignore_files_and_gpuhopignore(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {
        ".gitignore": "*.ckpt\ndata/\n", "a.ckpt": "", "train.py": "", "data/big": "",
        "sub/.gitignore": "!keep.ckpt\n", "sub/keep.ckpt": "", "sub/drop.ckpt": "",
        ".gpuhopignore": "notes.md\n", "notes.md": "", ".git/config": "",
    })
    assert paths(root) == [".gitignore", ".gpuhopignore", "sub", "sub/.gitignore", "sub/keep.ckpt", "train.py"]


def test_rules_of_the_enclosing_git_repository_apply(tmp_path: Path) -> None:
    tree(tmp_path, {".git/HEAD": "", ".gitignore": "__pycache__/\n/w/secret\n"})
    root = tree(tmp_path / "w", {"a.py": "", "__pycache__/a.pyc": "", "secret": ""})
    assert paths(root) == ["a.py"]


def test_archive_is_deterministic_and_content_addressed(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {"b.py": "print(2)\n", "a/x.py": "print(1)\n", "run.sh": "echo hi\n"})
    (root / "run.sh").chmod(0o755)
    os.symlink("a/x.py", root / "link.py")
    first, _ = workdir.pack(root)
    os.utime(root / "b.py", (1, 1))  # times, owners and the order of creation do not matter
    (root / "b.py").chmod(0o600)
    second, _ = workdir.pack(root)
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        members = {m.name: m for m in tar}
    assert list(members) == ["a", "a/x.py", "b.py", "link.py", "run.sh"]
    assert members["run.sh"].mode == 0o755 and members["b.py"].mode == 0o644
    assert members["link.py"].issym() and members["link.py"].linkname == "a/x.py"
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members.values())
    (root / "b.py").write_text("print(3)\n")
    assert workdir.sha256(workdir.pack(root)[0]) != workdir.sha256(first)


def test_a_link_to_a_file_outside_travels_as_the_file(tmp_path: Path) -> None:
    (tmp_path / "shared.py").write_text("X = 1\n")
    root = tmp_path / "w"
    root.mkdir()
    os.symlink(tmp_path / "shared.py", root / "shared.py")  # as examples/train.py is
    data, t = workdir.pack(root)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.getmember("shared.py")
        assert member.isreg() and tar.extractfile(member).read() == b"X = 1\n"  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["missing", "file", "loop", "dangling", "dir_outside", "fifo", "not_utf8",
                                  "newline", "unreadable"])
def test_trees_that_cannot_travel_are_refused_with_the_path(tmp_path: Path, kind: str) -> None:
    root = tree(tmp_path / "w", {"ok.py": ""})
    named = {"missing": "nope", "file": "ok.py", "loop": "loop", "dangling": "gone", "dir_outside": "outside",
             "fifo": "pipe", "not_utf8": "\\xff", "newline": "bad\\nname", "unreadable": "secret"}[kind]
    target = root
    if kind == "missing":
        target = tmp_path / "nope"
    elif kind == "file":
        target = root / "ok.py"
    elif kind == "loop":
        os.symlink("loop2", root / "loop")
        os.symlink("loop", root / "loop2")
    elif kind == "dangling":
        os.symlink("nothing-here", root / "gone")
    elif kind == "dir_outside":
        os.symlink(tmp_path, root / "outside")
    elif kind == "fifo":
        os.mkfifo(root / "pipe")
    elif kind == "not_utf8":
        os.close(os.open(os.path.join(os.fsencode(root), b"\xff"), os.O_CREAT | os.O_WRONLY))
    elif kind == "newline":
        (root / "bad\nname").write_text("")
    else:
        if os.geteuid() == 0:  # root reads anything: scan as an unprivileged user instead
            _refused_as_nobody(named)
            return
        (root / "secret").write_text("")
        (root / "secret").chmod(0)
    with pytest.raises(WorkdirError) as exc:
        workdir.pack(target)
    assert named in str(exc.value) or named in repr(str(exc.value))


def _refused_as_nobody(named: str) -> None:
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        root = tree(base / "w", {"ok.py": "", named: ""})
        (root / named).chmod(0)
        code = ("import sys, pathlib; from orchestrator import workdir\ntry:\n workdir.pack(pathlib.Path(sys.argv[1]))\n"
                "except workdir.WorkdirError as e:\n print(e); sys.exit(3)")
        # the system's python, and a copy of the two modules it needs: the virtualenv and the
        # checkout may live where nobody cannot reach (under /root, or a 0700 temporary dir)
        python = shutil.which("python3", path="/usr/bin:/usr/local/bin") or sys.executable
        package = base / "src" / "orchestrator"
        package.mkdir(parents=True)
        for module in ("__init__.py", "workdir.py", "ignore.py"):
            shutil.copy(Path(workdir.__file__).parent / module, package / module)
        for d in (base / "src", package):
            d.chmod(0o755)
        r = subprocess.run([python, "-c", code, str(root)], capture_output=True, text=True, timeout=60,
                           cwd=base / "src", user=65534, group=65534)
    finally:
        shutil.rmtree(base)
    assert r.returncode == 3, r.stderr
    assert named in r.stdout and "permission denied" in r.stdout


def test_too_big_names_size_limit_and_biggest_entries(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {"train.py": "print(1)\n"})
    (root / "data").mkdir()
    (root / "data" / "blob.bin").write_bytes(os.urandom(300_000))  # incompressible
    with pytest.raises(WorkdirError) as exc:
        workdir.pack(root, max_bytes=100_000)
    message = str(exc.value)
    assert "over the limit of 97.7 KB compressed" in message and "293.0 KB of files" in message
    assert "biggest entries to ignore in .gpuhopignore: data/ 293.0 KB, train.py 9 B" in message


# ----------------------------------------------------------------- unsafe archives


def archive(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def tar_bomb() -> bytes:
    """A gzip of well under 1 MB that unpacks to 64 MB of zeros."""
    class Zeros:
        def read(self, n: int = -1) -> bytes:
            return bytes(n)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = member("zeros")
        info.size = 64 << 20
        tar.addfile(info, Zeros())  # type: ignore[arg-type]
    return buf.getvalue()


UNSAFE = {
    "absolute": archive((member("/etc/evil"), b"x")),
    "dotdot": archive((member("a/../../evil"), b"x")),
    "symlink_out": archive((member("l", tarfile.SYMTYPE, "../../etc"), b"")),
    "symlink_abs": archive((member("l", tarfile.SYMTYPE, "/etc/passwd"), b"")),
    # each link alone stays inside; followed through each other they climb out
    "symlink_chain": archive((member("sub", tarfile.DIRTYPE), b""), (member("sub/up", tarfile.SYMTYPE, ".."), b""),
                             (member("esc", tarfile.SYMTYPE, "sub/up/.."), b"")),
    "hardlink_out": archive((member("h", tarfile.LNKTYPE, "../../etc/passwd"), b"")),
    "device": archive((member("dev", tarfile.CHRTYPE), b"")),
    "fifo": archive((member("p", tarfile.FIFOTYPE), b"")),
    "not_gzip": b"PK\x03\x04 this is a zip",
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_the_agent_refuses_unsafe_archives_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "work"
    dest.mkdir()
    with pytest.raises(OSError, match="workdir: "):
        agent.unpack_workdir(UNSAFE[kind], str(dest), 1 << 20)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_the_agent_and_the_daemon_refuse_a_tar_bomb_early(tmp_path: Path) -> None:
    bomb = tar_bomb()
    assert len(bomb) < 1 << 20
    dest = tmp_path / "work"
    dest.mkdir()
    with pytest.raises(OSError, match="unpacks to more than"):
        agent.unpack_workdir(bomb, str(dest), 8 << 20)
    assert list(dest.iterdir()) == []
    with pytest.raises(WorkdirError, match="unpacks to more than"):
        workdir.inspect_archive(bomb, 8 << 20)


@pytest.mark.parametrize("kind", sorted(set(UNSAFE) - {"symlink_chain"}))
def test_the_daemon_refuses_unsafe_archives(kind: str) -> None:
    # (the chain of links is only seen for what it is once unpacked: the agent's check)
    with pytest.raises(WorkdirError):
        workdir.inspect_archive(UNSAFE[kind])


def test_a_packed_tree_unpacks_the_same(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {"pkg/mod.py": "X = 1\n", "run.sh": "echo\n"})
    (root / "run.sh").chmod(0o755)
    os.symlink("pkg/mod.py", root / "alias.py")
    (root / "empty").mkdir()
    data, _ = workdir.pack(root)
    assert workdir.inspect_archive(data) == len("X = 1\n") + len("echo\n")
    dest = Path(tempfile.mkdtemp(dir=tmp_path))
    agent.unpack_workdir(data, str(dest), 1 << 20)
    assert (dest / "alias.py").read_text() == "X = 1\n" and (dest / "empty").is_dir()
    assert os.access(dest / "run.sh", os.X_OK) and not os.access(dest / "pkg/mod.py", os.X_OK)


# ----------------------------------------------------------------- the agent's fetch


class _Daemon(http.server.BaseHTTPRequestHandler):
    """A stand-in for the daemon's GET /v1/agent/workdir: serves `body`, records the headers."""

    body = b""
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_agent_fetches_with_its_token_checks_the_hash_and_unpacks_where_told(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {"main.py": "print(1)\n"})
    data, _ = workdir.pack(root)
    _Daemon.body, _Daemon.seen = data, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Daemon)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/agent/report"
        reporter = agent.Reporter(url, "t" * 64, "gpuhop-abc-1", None)
        fixed = tmp_path / "scratch" / "workdir"
        fixed.parent.mkdir()
        env = {"GPUHOP_WORKDIR": workdir.sha256(data), "GPUHOP_WORKDIR_PATH": str(fixed)}
        assert agent.prepare_workdir(env, reporter, None) == str(fixed)
        assert (fixed / "main.py").read_text() == "print(1)\n"
        assert _Daemon.seen[0]["Authorization"] == "Bearer " + "t" * 64
        assert _Daemon.seen[0]["X-Gpuhop-Attempt"] == "gpuhop-abc-1"
        with pytest.raises(OSError, match="another sha256"):  # what the launch named, or nothing
            agent.prepare_workdir({"GPUHOP_WORKDIR": "0" * 64}, reporter, None)
        assert agent.prepare_workdir({}, reporter, None) is None  # a job without a workdir
        with pytest.raises(OSError, match="no daemon URL"):
            agent.prepare_workdir(env, agent.Reporter("", "", "gpuhop-abc-1", None), None)
    finally:
        server.shutdown()
        server.server_close()


def test_a_local_container_job_starts_in_its_mounted_workdir() -> None:
    argv = container_argv("docker", "gpuhop-j-1", "img", ["python3", "run.py"], [], {}, None, [],
                          [(Path("/v/.scratch/x"), "/gpuhop/scratch")], [], "/gpuhop/scratch/workdir")
    assert argv[argv.index("--workdir") + 1] == "/gpuhop/scratch/workdir"
    assert argv[-4:] == ["--", "img", "python3", "run.py"]
