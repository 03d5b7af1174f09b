"""The pump between a channel and git's pipes: every byte, in order, with backpressure,
and no descriptor left behind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys

from gateway.git import bridge


class Empty:
    async def read(self, n: int = -1) -> bytes:
        return b""


class Slow:
    """A writer whose drain yields often, like an SSH channel with a small window."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self.writes += 1

    async def drain(self) -> None:
        if self.writes % 3 == 0:
            await asyncio.sleep(0.001)


PRODUCER = (
    "import hashlib, sys\n"
    "out = sys.stdout.buffer\n"
    "digest = hashlib.sha256()\n"
    "for i in range(400):\n"
    "    block = hashlib.sha256(str(i).encode()).digest() * 1000\n"
    "    digest.update(block)\n"
    "    out.write(block)\n"
    "out.flush()\n"
    "sys.stderr.write(digest.hexdigest())\n"
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_stdout_arrives_whole_and_in_order_and_no_fd_leaks():
    before = open_fds()
    for _ in range(3):
        out, err = Slow(), Slow()
        errors: list[bytes] = []
        err.write = errors.append  # type: ignore[method-assign]
        outcome = await bridge.run(
            [sys.executable, "-c", PRODUCER],
            dict(os.environ),
            bridge.Channel(Empty(), out, err),
        )
        assert outcome.returncode == 0
        assert out.size == outcome.bytes_out == 400 * 32 * 1000
        assert out.digest.hexdigest() == b"".join(errors).decode()
    assert open_fds() == before


def watched(fd: int) -> bool:
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    try:
        selector.get_key(fd)
    except KeyError:
        return False
    return True


async def test_reader_waits_for_data_and_reports_the_end():
    read, write = os.pipe()
    reader = bridge.PipeReader(read)
    got = asyncio.create_task(reader.read())
    for _ in range(5):
        await asyncio.sleep(0)  # let the loop run the reader: it must still be waiting
    # Waiting means registered with epoll (no polling), and nothing read yet.
    assert not got.done() and watched(read)
    os.write(write, b"hello")
    assert await asyncio.wait_for(got, 5) == b"hello"
    assert not watched(read)  # watched only while a read waits: a full channel is backpressure
    os.close(write)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    reader.close()


async def test_cancelled_read_leaves_no_watch_behind():
    """A pump cancelled mid-wait (client gone, session ended) leaves the loop without the
    descriptor, so closing it cannot point the loop at a reused number."""
    read, write = os.pipe()
    reader = bridge.PipeReader(read)
    waiting = asyncio.create_task(reader.read())
    for _ in range(3):
        await asyncio.sleep(0)
    assert watched(read)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert not watched(read)
    reader.close()
    os.close(write)


class Failing:
    """A stderr channel that fails with an unexpected error: the stdout pump must still be
    stopped before git's stdout is closed."""

    def write(self, data: bytes) -> None:
        raise RuntimeError("unexpected")

    async def drain(self) -> None:
        return None


async def test_one_pump_failing_stops_the_other_before_its_pipe_is_closed():
    before = open_fds()
    script = "import sys, time; sys.stderr.write('x'); sys.stderr.flush(); time.sleep(30)"
    with contextlib.suppress(RuntimeError):
        await asyncio.wait_for(
            bridge.run(
                [sys.executable, "-c", script],
                dict(os.environ),
                bridge.Channel(Empty(), Slow(), Failing()),
                idle_timeout=2,
            ),
            20,
        )
    loop = asyncio.get_running_loop()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    assert not tasks
    assert open_fds() == before
