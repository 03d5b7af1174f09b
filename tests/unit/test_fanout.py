"""One reader per followed deploy: however many watch it, the registry is read once per
flush; a watcher that lags has output skipped (with a marker), never holds up the others."""

from __future__ import annotations

import asyncio
import dataclasses

from gateway.deploys.fanout import LogReaders
from gateway.deploys.queue import Wakeups
from gateway.models import DeployStatus, LogChunk


@dataclasses.dataclass
class FakeDeploy:
    status: DeployStatus = DeployStatus.RUNNING
    elapsed: float = 0.0


class FakeStore:
    """A deploy's log in memory, counting the reads a real registry would serve."""

    def __init__(self) -> None:
        self.chunks: list[LogChunk] = []
        self.deploy = FakeDeploy()
        self.log_reads = 0

    def append(self, text: str) -> None:
        position = self.chunks[-1].end if self.chunks else 0
        size = len(text.encode())
        self.chunks.append(LogChunk(len(self.chunks) + 1, position, size, False, text))

    async def deploy_log(self, deploy_id: int, after: int = 0, limit: int = 1000):  # type: ignore[no-untyped-def]
        self.log_reads += 1
        return [c for c in self.chunks if c.seq > after][:limit]

    async def get_deploy(self, deploy_id: int):  # type: ignore[no-untyped-def]
        return self.deploy


def readers(store: FakeStore, wakeups: Wakeups, keep: int = 1 << 20) -> LogReaders:
    return LogReaders(store, wakeups, lambda: 30.0, lambda: keep)  # type: ignore[arg-type]


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_many_followers_share_one_read_per_flush() -> None:
    store, wakeups = FakeStore(), Wakeups()
    store.append("before\n")
    fanout = readers(store, wakeups)
    got: list[list[str]] = [[] for _ in range(50)]

    def sayer(index: int):  # type: ignore[no-untyped-def]
        async def say(text: str) -> None:
            got[index].append(text)

        return say

    watching = [
        asyncio.ensure_future(fanout.watch(1, sayer(i), asyncio.Event())) for i in range(50)
    ]
    await until(lambda: all(g for g in got))
    assert len(fanout.readers) == 1
    reads = store.log_reads
    for flush in range(10):
        store.append(f"flush {flush}\n")
        wakeups.fire(1)
        await until(lambda f=flush: all(g[-1] == f"flush {f}\n" for g in got))
    # One reader's reads per flush (a page, and the record when caught up), not 50 of each.
    assert store.log_reads - reads <= 10 * 2
    store.deploy.status = DeployStatus.SUCCEEDED
    wakeups.fire(1)
    finals = await asyncio.wait_for(asyncio.gather(*watching), 5)
    assert all(final is store.deploy for final in finals)
    assert all("".join(g) == "before\n" + "".join(f"flush {f}\n" for f in range(10)) for g in got)
    assert fanout.readers == {}  # the reader ended with the deploy


async def test_regression_a_lagging_follower_skips_output_and_holds_up_nobody(caplog) -> None:
    caplog.set_level("INFO", logger="gateway.deploys")
    store, wakeups = FakeStore(), Wakeups()
    fanout = readers(store, wakeups, keep=4096)
    stuck, fast = asyncio.Event(), []
    slow: list[str] = []

    async def slow_say(text: str) -> None:
        slow.append(text)
        await stuck.wait()  # its client's window is full

    async def fast_say(text: str) -> None:
        fast.append(text)

    store.append("start\n")
    slow_task = asyncio.ensure_future(fanout.watch(1, slow_say, asyncio.Event()))
    fast_task = asyncio.ensure_future(fanout.watch(1, fast_say, asyncio.Event()))
    await until(lambda: slow and fast)
    for flush in range(20):  # 20 KB while the slow one reads nothing
        store.append(f"{flush:04d}" + "x" * 1019 + "\n")
        wakeups.fire(1)
        await until(lambda f=flush: fast[-1].startswith(f"{f:04d}"))
    assert all(f.backlog <= 4096 for f in fanout.readers[1].followers)  # bounded per follower
    assert "event=watcher_lagging deploy=1" in caplog.text
    stuck.set()  # it reads again: what it lost is a marker, then the newest output
    store.deploy.status = DeployStatus.SUCCEEDED
    wakeups.fire(1)
    await asyncio.wait_for(asyncio.gather(slow_task, fast_task), 5)
    shown = "".join(slow)
    assert "bytes skipped: this watcher fell behind the deploy" in shown
    assert "0019" in shown and "0005" not in shown
    assert "".join(fast).count("x" * 1019) == 20


async def test_a_follower_that_leaves_stops_the_reader_when_it_was_the_last() -> None:
    store, wakeups = FakeStore(), Wakeups()
    store.append("hello\n")
    fanout = readers(store, wakeups)
    got: list[str] = []

    async def say(text: str) -> None:
        got.append(text)

    task = asyncio.ensure_future(fanout.watch(1, say, asyncio.Event()))
    await until(lambda: got)
    reader = fanout.readers[1]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert fanout.readers == {}  # at once: the next watcher does not join a reader that ends
    again: list[str] = []

    async def say_again(text: str) -> None:
        again.append(text)

    second = asyncio.ensure_future(fanout.watch(1, say_again, asyncio.Event()))
    await asyncio.wait_for(asyncio.gather(reader.task, return_exceptions=True), 5)
    await until(lambda: again)
    assert again == ["hello\n"] and fanout.readers[1] is not reader
    store.deploy.status = DeployStatus.SUCCEEDED
    wakeups.fire(1)
    assert await asyncio.wait_for(second, 5) is store.deploy
