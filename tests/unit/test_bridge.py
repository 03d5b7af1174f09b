"""The pump between a channel and git's pipes: every byte, in order, with backpressure,
and no descriptor left behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys

from gateway import bridge


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


async def test_reader_waits_for_data_and_reports_the_end():
    read, write = os.pipe()
    reader = bridge.PipeReader(read)
    got = asyncio.create_task(reader.read())
    for _ in range(5):
        await asyncio.sleep(0)  # let the loop run the reader: it must still be waiting
    assert not got.done()  # nothing written yet: it waits, it does not spin or fail
    os.write(write, b"hello")
    assert await asyncio.wait_for(got, 5) == b"hello"
    os.close(write)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    reader.close()
