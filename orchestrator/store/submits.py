"""Group commit for submits: the API's submits wait in one queue, and whatever has gathered
while the previous batch was being written goes to the database together, in one transaction
(`Store.create_jobs`, a savepoint per job). Under load that turns a commit, a thread hand-off
and a wake-up of the event loop per submit into one per batch; a lone submit is written at once,
as before. Every submit still gets its own answer: its row, or the Conflict that refused it.
"""

from __future__ import annotations

import asyncio
import sys

from orchestrator.models import JobSpec
from orchestrator.store.errors import Conflict
from orchestrator.store.repo import NewJob, Store
from orchestrator.store.tables import JobRow

MAX_BATCH = 256


class SubmitQueue:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[tuple[NewJob, asyncio.Future[JobRow | Conflict]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions the submits took (for tests and benchmarks)

    async def create(self, job_id: str, spec: JobSpec, reuse_volume: bool) -> JobRow:
        """Record one job (see `Store.create_job`), together with whatever else is waiting."""
        future: asyncio.Future[JobRow | Conflict] = asyncio.get_running_loop().create_future()
        self._pending.append((NewJob(job_id, spec, reuse_volume), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        result = await asyncio.shield(future)  # a client gone away does not take others' answers
        if isinstance(result, Conflict):
            raise result
        return result

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            self.batches += 1
            try:
                results = await self.store.run(self.store.create_jobs, [job for job, _ in batch])
            except Exception:
                if len(batch) == 1:
                    raise_into(batch[0][1])
                    continue
                # the database failed the batch (a deadlock, a dropped connection, one bad
                # row): each submit is tried alone, so only the one at fault hears of it
                for job, future in batch:
                    try:
                        (result,) = await self.store.run(self.store.create_jobs, [job])
                    except Exception:
                        raise_into(future)
                    else:
                        answer(future, result)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                answer(future, result)


def answer(future: asyncio.Future[JobRow | Conflict], result: JobRow | Conflict) -> None:
    if not future.done():
        future.set_result(result)


def raise_into(future: asyncio.Future[JobRow | Conflict]) -> None:
    """Hand the exception being handled to the submit waiting on `future`."""
    exc = sys.exc_info()[1]
    if not future.done() and exc is not None:
        future.set_exception(exc)
