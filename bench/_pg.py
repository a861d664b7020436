"""A schema of its own in the machine's test PostgreSQL for a benchmark (as the store tests
make), so nothing else in that database is touched. Left behind for inspection, named after
the benchmark and the time."""

from __future__ import annotations

import time

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def fresh_schema(prefix: str) -> str:
    """Create `<prefix>_<time>` and return a SQLAlchemy URL whose search_path is it."""
    import psycopg

    schema = f"{prefix}_{time.time_ns()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
