"""`gpuhop demo`, the README's first command, runs to the end, reports success, and leaves no
process behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _gpuhop_processes() -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry}/stat") as fh:
                zombie = ") Z " in fh.read()
        except OSError:
            continue
        if b"GPUHOP_ATTEMPT_NAME=" in env and not zombie:
            out.add(int(entry))
    return out


def test_demo_runs_clean() -> None:
    before = _gpuhop_processes()
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo"], capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "No machine is left running" in r.stdout
    for name in ("llama-finetune", "sdxl-lora", "whisper-eval", "tokenize-corpus", "bert-pretrain"):
        assert name in r.stdout
    assert "preempted, succeeded" in r.stdout and "lost, succeeded" in r.stdout
    assert "NO (" not in r.stdout  # every step exactly once
    assert _gpuhop_processes() - before == set()
