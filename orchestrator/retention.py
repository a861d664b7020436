"""Retention of what grows with every job: attempt output files under `<state_dir>/logs`
(`<attempt name>.log`, and the agent's offsets beside them). The store prunes its own events
(`Store.prune`); this prunes the files. A file goes when its attempt is not live and nothing
wrote it for the retention period, so a job's output stays readable for that long after it
ended, and a live attempt's file is never touched however quiet it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger("gpuhop.engine")


def prune_logs(logs_dir: Path, live_names: Collection[str], older_than: float) -> int:
    """Delete output files in `logs_dir` last written before `older_than` (UNIX seconds) whose
    attempt (the file name up to its first '.') is not in `live_names`. Returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(logs_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            continue
        if entry.name.split(".", 1)[0] in live_names:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= older_than:
                continue
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not delete old output file %s: %s", entry.path, exc)
    return removed
