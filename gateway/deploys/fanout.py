"""One reader per followed deploy in this process: however many watch a deploy's log, the
registry is read once per flush, and each watcher takes the chunks at its own pace."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..domain.deploylog import FLUSH_INTERVAL
from ..errors import GatewayError, NotFound, StoreUnavailable
from ..models import Deploy, LogChunk
from ..store import Store
from .pushes import PushSession
from .queue import Wakeups
from .watch import PAGE, RETRY, Say, deliver, text_for

log = logging.getLogger("gateway.deploys")

# Writes per second all the followers of one deploy in this process get, at most: with many
# followers, each gets the output in fewer, larger pieces (an SSH write costs about the same
# for 100 bytes as for 10 KB), so that their number does not cost the other tenants. Up to
# 50 followers, each gets every flush as it comes.
WRITES_PER_SECOND = 500


class Follower:
    """One watcher's place at a reader: the chunks read for it and not yet taken, and the
    deploy's end once the reader saw it.

    The reader and the other followers never wait for it: at most `limit` bytes (what the
    registry keeps of a log) wait for it; when it is further behind, the oldest are skipped
    and it reads a marker in their place, as it would reading the registry itself. One that
    stops reading altogether is dropped by `deliver`."""

    def __init__(self, deploy_id: int, history: list[LogChunk], limit: int) -> None:
        self.deploy_id = deploy_id
        self.limit = limit
        # What the reader holds of the log as it was when this follower joined.
        self.chunks: deque[LogChunk] = deque(history)
        self.backlog = sum(chunk.size for chunk in history)
        self.lagged = False
        self.final: Deploy | None = None
        self.error: GatewayError | None = None
        self.news = asyncio.Event()

    def put(self, chunks: list[LogChunk]) -> None:
        for chunk in chunks:
            self.chunks.append(chunk)
            self.backlog += chunk.size
        while self.backlog > self.limit and len(self.chunks) > 1:
            # The gap before the next chunk becomes a "fell behind" marker for this watcher.
            self.backlog -= self.chunks.popleft().size
            if not self.lagged:  # once per watcher: a slow reader is one line
                self.lagged = True
                log.info("event=watcher_lagging deploy=%d backlog=%d", self.deploy_id, self.limit)
        self.news.set()

    def take(self) -> list[LogChunk]:
        """The next chunks, a page at most: what one delivery holds stays bounded."""
        chunks = [self.chunks.popleft() for _ in range(min(PAGE, len(self.chunks)))]
        self.backlog -= sum(chunk.size for chunk in chunks)
        if not self.chunks:
            self.news.clear()
        return chunks

    def end(self, final: Deploy | None, error: GatewayError | None) -> None:
        self.final, self.error = final, error
        self.news.set()


class LogReader:
    """Reads one deploy's log from the registry for every follower in this process, and
    hands each new page to all of them. It holds the log's tail (at most `keep()` bytes, what
    the registry keeps too): a new follower starts from there, with no query of its own."""

    def __init__(
        self,
        store: Store,
        wakeups: Wakeups,
        deploy_id: int,
        poll: Callable[[], float],
        keep: Callable[[], int],
        forget: Callable[[LogReader], None],
    ) -> None:
        self.store = store
        self.wakeups = wakeups
        self.deploy_id = deploy_id
        self.poll = poll
        self.keep = keep
        self._forget = forget
        self.after = 0  # the last seq read
        self.history: deque[LogChunk] = deque()
        self._held = 0  # bytes in `history`
        self.followers: set[Follower] = set()
        self.holders = 0  # watchers using it, joined or about to: none left stops it
        self.started = asyncio.Event()
        self.ended = False
        self.final: Deploy | None = None
        self.error: GatewayError | None = None
        self.task = asyncio.ensure_future(self._run())

    def join(self) -> Follower:
        """A new follower (once `started`): the tail read so far, then every chunk read."""
        follower = Follower(self.deploy_id, list(self.history), self.keep())
        if self.ended:
            follower.end(self.final, self.error)
        else:
            self.followers.add(follower)
        return follower

    def release(self, follower: Follower | None) -> None:
        if follower is not None:
            self.followers.discard(follower)
        self.holders -= 1
        if self.holders <= 0 and not self.ended:
            # Nobody watches any more: forgotten at once, so that a watcher coming before
            # the cancellation lands starts a reader of its own rather than join this one.
            self._forget(self)
            self.task.cancel()

    async def _run(self) -> None:
        final: Deploy | None = None
        error: GatewayError | None = None
        try:
            final = await self._read()
        except asyncio.CancelledError:
            error = GatewayError("watching stopped: the gateway is stopping")
            raise
        except GatewayError as exc:
            error = exc
        except Exception:
            log.exception("event=deploy_log_reader_failed deploy=%d", self.deploy_id)
            error = GatewayError(f"the log of deploy #{self.deploy_id} cannot be read now")
        finally:
            self._end(final, error)

    async def _read(self) -> Deploy:
        """Read the log until the deploy ends, as `watch.watch` does, for all followers."""
        final: Deploy | None = None
        while True:
            try:
                chunks = await self.store.deploy_log(self.deploy_id, self.after, PAGE)
                if len(chunks) < PAGE and final is None:
                    deploy = await self.store.get_deploy(self.deploy_id)
                    if deploy is None:
                        raise NotFound(f"no deploy #{self.deploy_id}")
                    if deploy.status.finished:
                        final = deploy
                        continue  # the log is whole now: read what is left of it
                reachable = True
            except StoreUnavailable:
                chunks, reachable = [], False
            if chunks:
                self.after = chunks[-1].seq
                self._hold(chunks)
                for follower in self.followers:
                    follower.put(chunks)
                if len(chunks) == PAGE or final is not None:
                    continue  # more to read now
            if final is not None:
                return final
            self.started.set()  # caught up: followers may join
            await self.wakeups.wait(self.deploy_id, self.poll() if reachable else RETRY)

    def _hold(self, chunks: list[LogChunk]) -> None:
        self.history.extend(chunks)
        self._held += sum(chunk.size for chunk in chunks)
        while self._held > self.keep() and len(self.history) > 1:
            self._held -= self.history.popleft().size

    def _end(self, final: Deploy | None, error: GatewayError | None) -> None:
        self.ended = True
        self.final, self.error = final, error
        self._forget(self)  # a later watcher starts a reader of its own
        for follower in self.followers:
            follower.end(final, error)
        self.started.set()


class LogReaders:
    """The readers of this process, one per deploy being watched."""

    def __init__(
        self,
        store: Store,
        wakeups: Wakeups,
        poll: Callable[[], float],
        keep: Callable[[], int],
    ) -> None:
        self.store = store
        self.wakeups = wakeups
        self.poll = poll
        self.keep = keep
        self.readers: dict[int, LogReader] = {}

    def _forget(self, reader: LogReader) -> None:
        if self.readers.get(reader.deploy_id) is reader:
            del self.readers[reader.deploy_id]

    async def close(self) -> None:
        for reader in list(self.readers.values()):
            reader.task.cancel()
            with contextlib.suppress(BaseException):
                await reader.task

    async def watch(
        self,
        deploy_id: int,
        say: Say,
        draining: asyncio.Event,
        *,
        session: PushSession | None = None,
        until_done: bool = False,
    ) -> Deploy | None:
        """Stream a deploy's log to `say` until it ends; return the final record, or None if
        the watcher went away first (unless `until_done`, for callers that need the result).
        The same contract as `watch.watch`, with the registry read once for all watchers."""
        if await self.store.get_deploy(deploy_id) is None:
            raise NotFound(f"no deploy #{deploy_id}")
        reader = self.readers.get(deploy_id)
        if reader is None:
            reader = self.readers[deploy_id] = LogReader(
                self.store, self.wakeups, deploy_id, self.poll, self.keep, self._forget
            )
        reader.holders += 1
        follower: Follower | None = None
        try:
            if not await _until(reader.started.wait(), session, until_done):
                return None
            follower = reader.join()
            return await self._follow(reader, follower, say, draining, session, until_done)
        finally:
            reader.release(follower)

    async def _follow(
        self,
        reader: LogReader,
        follower: Follower,
        say: Say,
        draining: asyncio.Event,
        session: PushSession | None,
        until_done: bool,
    ) -> Deploy | None:
        at = 0
        watching = True
        # The tail the reader held when it joined, then what it reads, as it reads it.
        while True:
            chunks = follower.take()
            if chunks:
                text, at = text_for(chunks, at), chunks[-1].end
                if watching and text:
                    watching = await deliver(say, text, draining)
                    if not watching and not until_done:
                        return None
                    pace = len(reader.followers) / WRITES_PER_SECOND
                    if pace > FLUSH_INTERVAL and not await _until(
                        asyncio.sleep(pace), session, until_done
                    ):
                        return None
                continue  # more may have come meanwhile
            if follower.error is not None:
                raise follower.error
            if follower.final is not None:
                return follower.final
            if not await _until(follower.news.wait(), session, until_done):
                return None


async def _until(awaitable: Awaitable[Any], session: PushSession | None, until_done: bool) -> bool:
    """Await `awaitable`, unless the pusher of `session` leaves first (False then); with
    `until_done`, the caller needs the result whoever leaves."""
    waiting = asyncio.ensure_future(awaitable)
    if session is None or until_done:
        await waiting
        return True
    left = asyncio.ensure_future(session.detached.wait())
    try:
        await asyncio.wait({waiting, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (waiting, left):
            pending.cancel()
    return not session.detached.is_set()
