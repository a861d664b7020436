"""Group commit for writes many tasks make at once, each waiting for its own answer.

After a wave of preemptions a hundred launch workers each want their write-ahead record
committed before calling the provider, and each confirmed launch wants its machine recorded.
One transaction per write made the store's single writer the queue every replacement waited
in (issue 9: 268 ms from queued to a launch worker, median, for 100 replacements). Here the
first write goes at once, alone; whatever arrives while it is being written goes in the next
transaction together. Nothing waits on a timer, so a lone write is as quick as before, and under
load the number of transactions follows the store's speed, not the number of writers.

`write` answers each item in order, with a result or the exception that refused that item
alone; an exception raised by `write` itself (the database went away) is every item's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item to write
R = TypeVar("R")  # its answer

__all__ = ["GroupCommit"]


class GroupCommit(Generic[I, R]):
    def __init__(self, run: Callable[[Callable[[Sequence[I]], Sequence[R | Exception]], list[I]],
                                     Awaitable[Sequence[R | Exception]]],
                 write: Callable[[Sequence[I]], Sequence[R | Exception]], max_batch: int = 256) -> None:
        """`run(write, items)` runs `write` where it may block (the store's threads)."""
        self._run = run
        self._write = write
        self._max = max_batch
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0  # how many writes were made (for tests and benchmarks)

    async def submit(self, item: I) -> R:
        """Write `item` with whatever else is waiting; its answer, or raise its refusal. A
        caller that is cancelled does not take its item back: it may be written all the same."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self._waiting.append((item, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="group-commit")
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        batch: list[tuple[I, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:self._max], self._waiting[self._max:]
                self.transactions += 1
                try:
                    answers = await self._run(self._write, [item for item, _ in batch])
                except Exception as exc:  # every item's answer
                    answers = [exc] * len(batch)
                if len(answers) != len(batch):  # a bug in `write`: say so to every caller
                    answers = [RuntimeError(f"group write answered {len(answers)} of {len(batch)} items")] * len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future.done():
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
                batch = []
        finally:
            self._writer = None
            # empty unless cancelled while writing (the loop is closing): whether those were
            # written is for the next start to find out, as after a crash
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting = []


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A refusal whose caller was cancelled is not an unretrieved exception."""
    if not future.cancelled():
        future.exception()
