"""Schemathesis hooks for bench/schemathesis_run.py: a generated `follow=true` would stream the
log of a job that never ends (nothing runs in the fuzzed daemon), so it is asked without follow;
streaming is tested in tests/test_logs_follow.py."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_query(ctx: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(query, dict) and query.get("follow") in (True, "true"):
        query = {**query, "follow": "false"}
    return query
