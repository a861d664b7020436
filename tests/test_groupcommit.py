"""orchestrator/groupcommit.py: writes that arrive while one is being made share the next
transaction, a lone write goes at once, and each caller gets its own answer or refusal."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from orchestrator.groupcommit import GroupCommit


class Refused(Exception):
    pass


class Writer:
    """A store method stand-in run on a real thread: doubles each item, refuses negative ones,
    and (while `hold` is clear) blocks, as a slow commit would."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.broken = False

    def write(self, items: Sequence[int]) -> list[int | Exception]:
        self.hold.wait(10)
        if self.broken:
            raise OSError("database is locked")
        self.batches.append(list(items))
        return [Refused(f"{i} refused") if i < 0 else i * 2 for i in items]

    async def run(self, fn, items):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn, items)


async def test_a_lone_write_goes_at_once_in_its_own_transaction() -> None:
    w = Writer()
    group: GroupCommit[int, int] = GroupCommit(w.run, w.write)
    assert await asyncio.wait_for(group.submit(21), 5) == 42
    assert w.batches == [[21]] and group.transactions == 1


async def test_writes_made_while_one_is_in_flight_share_the_next_transaction() -> None:
    w = Writer()
    w.hold.clear()  # the first write is slow to commit
    group: GroupCommit[int, int] = GroupCommit(w.run, w.write)
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0.05)  # it is being written
    rest = [asyncio.create_task(group.submit(i)) for i in range(1, 50)]
    await asyncio.sleep(0.05)
    w.hold.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    assert answers == [i * 2 for i in range(50)]
    assert w.batches == [[0], list(range(1, 50))]  # 2 transactions for 50 writes, not 50


async def test_batches_are_bounded() -> None:
    w = Writer()
    w.hold.clear()
    group: GroupCommit[int, int] = GroupCommit(w.run, w.write, max_batch=10)
    tasks = [asyncio.create_task(group.submit(i)) for i in range(25)]
    await asyncio.sleep(0.05)
    w.hold.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == [i * 2 for i in range(25)]
    assert [len(b) for b in w.batches] == [10, 10, 5]


async def test_a_refusal_is_its_own_writers_alone_and_a_failed_write_everyones() -> None:
    w = Writer()
    w.hold.clear()
    group: GroupCommit[int, int] = GroupCommit(w.run, w.write)
    tasks = [asyncio.create_task(group.submit(i)) for i in (1, -2, 3)]
    await asyncio.sleep(0.05)
    w.hold.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], Refused) and str(results[1]) == "-2 refused"
    w.broken = True
    tasks = [asyncio.create_task(group.submit(i)) for i in (4, 5)]
    for task in tasks:
        with pytest.raises(OSError, match="locked"):
            await task
    w.broken = False
    assert await group.submit(6) == 12  # and the next write works again


async def test_a_cancelled_caller_does_not_stop_the_others_write() -> None:
    """A launch cancelled while its record is being written (the daemon stopping): the record
    is written all the same, as one already handed to the store's thread would be, and the
    others get their answers."""
    w = Writer()
    w.hold.clear()
    group: GroupCommit[int, int] = GroupCommit(w.run, w.write)
    gone = asyncio.create_task(group.submit(7))
    kept = asyncio.create_task(group.submit(8))
    await asyncio.sleep(0.05)
    gone.cancel()
    w.hold.set()
    assert await asyncio.wait_for(kept, 5) == 16
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert sorted(i for b in w.batches for i in b) == [7, 8]
