"""Output files are kept for `server.log_retention_days` after their attempt stops writing, and a
live attempt's file is never deleted however quiet it is (orchestrator/retention.py), on real
files with real modification times."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator.retention import prune_logs

DAY = 86400.0


def _file(logs: Path, name: str, age_days: float) -> Path:
    path = logs / name
    path.write_text("output\n")
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return path


def test_old_files_of_ended_attempts_go_and_nothing_else(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    old_ended = _file(logs, "gpuhop-aaaa-1.log", 40)
    old_ended_offsets = _file(logs, "gpuhop-aaaa-1.log.offset", 40)
    recent_ended = _file(logs, "gpuhop-bbbb-1.log", 5)
    quiet_live = _file(logs, "gpuhop-cccc-2.log", 90)  # a live attempt that printed nothing for months
    (logs / "a-directory.log").mkdir()
    os.utime(logs / "a-directory.log", (0, 0))
    removed = prune_logs(logs, {"gpuhop-cccc-2"}, time.time() - 30 * DAY)
    assert removed == 2
    assert not old_ended.exists() and not old_ended_offsets.exists()
    assert recent_ended.exists() and quiet_live.exists() and (logs / "a-directory.log").is_dir()


def test_a_missing_logs_dir_is_nothing_to_do(tmp_path: Path) -> None:
    assert prune_logs(tmp_path / "nope", set(), time.time()) == 0
