"""Pump bytes between an SSH channel and a git subprocess, with our own loops.

asyncssh's `process.redirect()` is not used: fed from asyncio subprocess streams it raced
and dropped connections on big clones, and onto raw pipes it closed git's stdin with data
still buffered. Three plain loops with 256 KiB reads and awaited drains keep backpressure
end to end (SSH window <-> pipe buffers) and never lose a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncssh

CHUNK = 256 * 1024
TERMINATE_GRACE = 5.0

# What a dead or closed SSH channel raises on read, write or drain.
CLIENT_GONE = (OSError, EOFError, asyncssh.Error)

log = logging.getLogger(__name__)


class Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class PipeReader:
    """git's stdout, read straight into one reused buffer.

    asyncio's pipe transport allocates a fresh 256 KiB buffer for every read and its
    StreamReader copies the data twice more; on a clone that was a third of the gateway's
    CPU (py-spy, `python -m bench.profile`). Here each read is one readv into the buffer and
    one copy out of it, and the descriptor is watched only while the pump waits, so a full
    SSH window leaves the bytes in the pipe (backpressure reaches git)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        # The pipe keeps its default size: larger pipes count against the user's pipe quota
        # (pipe-user-pages-soft), past which every new pipe of every session is tiny.
        os.set_blocking(fd, False)

    async def read(self, n: int = -1) -> bytes:
        while True:
            try:
                count = os.readv(self.fd, [self.buffer])
            except BlockingIOError:
                await self._readable()
                continue
            return bytes(self.view[:count])

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self.fd, _set_once, ready)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...


@dataclass(frozen=True)
class Channel:
    """The three streams of one SSH session, as the pump sees them."""

    stdin: Reader
    stdout: Writer
    stderr: Writer


@dataclass
class Outcome:
    returncode: int
    client_gone: bool
    bytes_in: int
    bytes_out: int
    idle: bool = False  # ended by the idle timeout


async def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    channel: Channel,
    *,
    cwd: Path | None = None,
    finish_on_hangup: bool = False,
    hangup: asyncio.Event | None = None,
    idle_timeout: float | None = None,
    label: str = "",
    started: Callable[[int], None] | None = None,
) -> Outcome:
    """Run argv with its stdio connected to the channel; return when it has exited.

    If the client goes away, the process is terminated unless `finish_on_hangup` is set:
    receive-pack must be left to finish (or fail) on its own, because killing it between
    ref updates is exactly what could leave a repository half-updated. `hangup`, if given,
    is set when the client goes away, so others (a deploy being watched) can react.
    `started` is called with the process id as soon as it exists.
    A transfer with no byte in either direction for `idle_timeout` seconds is terminated:
    a stalled client must not hold a git process (and its locks) forever.
    """
    out_read, out_write = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=out_write,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            limit=CHUNK,
            # Own process group: a termination reaches git's helpers (pack-objects...) too.
            start_new_session=True,
        )
    except BaseException:
        os.close(out_read)
        raise
    finally:
        os.close(out_write)  # git has its copy; ours would keep the pipe from ending
    stdout = PipeReader(out_read)
    if started is not None:
        started(proc.pid)
    if label:
        log.info("event=process_started pid=%d %s", proc.pid, label)
    hangup = hangup if hangup is not None else asyncio.Event()
    counts = {"in": 0, "out": 0}
    loop = asyncio.get_running_loop()
    last_activity = [loop.time()]
    idle = asyncio.Event()

    stdin, stderr = proc.stdin, proc.stderr
    if stdin is None or stderr is None:  # pragma: no cover - PIPE requested
        stdout.close()
        raise RuntimeError("subprocess pipes missing")

    async def client_to_process() -> None:
        try:
            while True:
                data = await channel.stdin.read(CHUNK)
                if not data:
                    break
                counts["in"] += len(data)
                last_activity[0] = loop.time()
                stdin.write(data)
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # git closed its stdin: it has exited or will report why on stderr
        except CLIENT_GONE:
            hangup.set()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                stdin.close()

    async def process_to_client(reader: Reader, writer: Writer, count: bool) -> None:
        forwarding = True
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return
            last_activity[0] = loop.time()
            if not forwarding:
                continue  # keep draining so git never blocks on a full pipe
            try:
                writer.write(data)
                await writer.drain()
                if count:
                    counts["out"] += len(data)
            except CLIENT_GONE:
                forwarding = False
                hangup.set()

    feeder = asyncio.create_task(client_to_process())
    pumps = [
        asyncio.create_task(process_to_client(stdout, channel.stdout, True)),
        asyncio.create_task(process_to_client(stderr, channel.stderr, False)),
    ]
    outputs = asyncio.gather(*pumps)

    async def watchdog() -> None:
        if idle_timeout is None:
            return
        # Wake at a fraction of the timeout: a transfer is cut at most ~10% late.
        period = max(min(idle_timeout / 10, 10.0), 0.05)
        while True:
            await asyncio.sleep(period)
            if loop.time() - last_activity[0] >= idle_timeout:
                idle.set()
                return

    waiter = asyncio.create_task(proc.wait())
    watcher = asyncio.create_task(watchdog())
    try:
        hung = asyncio.create_task(hangup.wait())
        stalled = asyncio.create_task(idle.wait())
        await asyncio.wait({waiter, hung, stalled}, return_when=asyncio.FIRST_COMPLETED)
        hung.cancel()
        stalled.cancel()
        if idle.is_set() and not waiter.done():
            log.info("event=idle_timeout pid=%d after=%s", proc.pid, idle_timeout)
            with contextlib.suppress(*CLIENT_GONE):
                channel.stderr.write(
                    f"error: transfer idle for {idle_timeout:g}s: closing\n".encode()
                )
            await _terminate(proc)
        elif hangup.is_set() and not finish_on_hangup and not waiter.done():
            await _terminate(proc)
        returncode = await waiter
        await outputs
    except BaseException:
        # Cancelled, or anything unexpected (a channel raising what it should not): git
        # must not outlive its session.
        await _terminate(proc)
        raise
    finally:
        watcher.cancel()
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        # Both pumps end before git's stdout is closed: gather does not cancel the other
        # when one fails, and a pump still reading a closed (and reused) descriptor could
        # read another session's pipe.
        for pump in pumps:
            pump.cancel()
        for pump in pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await outputs
        stdout.close()
    return Outcome(returncode, hangup.is_set(), counts["in"], counts["out"], idle.is_set())


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, then SIGKILL it if it does not leave in time."""
    if proc.returncode is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), TERMINATE_GRACE)
            return
        except TimeoutError:
            continue
