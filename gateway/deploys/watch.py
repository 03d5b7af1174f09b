"""Watching a deploy: its log, read from the registry wherever it runs, streamed to a pusher
or a `logs --follow`, never at the cost of the gateway's memory or of a drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..domain.deploylog import cut_marker, skip_marker
from ..errors import NotFound, StoreUnavailable
from ..models import Deploy, LogChunk
from ..store import Store
from .pushes import PushSession
from .queue import Wakeups

log = logging.getLogger("gateway.deploys")

Say = Callable[[str], Awaitable[None]]

# A watcher that cannot take the next piece of a deploy's output within this many seconds
# is dropped (the deploy goes on); once the gateway drains, within DRAIN_STALL.
WATCHER_STALL = 60.0
DRAIN_STALL = 2.0
# Chunks read at once: what one watcher holds in memory is bounded by this many chunks.
PAGE = 8
RETRY = 1.0  # seconds before reading again while the registry is unavailable


def text_for(chunks: list[LogChunk], at: int) -> str:
    """What a watcher who has read up to byte `at` is shown of these chunks: output cut
    from the log's start, or passed while it lagged, becomes a marker; the runner's final
    line is not shown (each watcher prints its own)."""
    parts = []
    for chunk in chunks:
        if chunk.position > at:
            missing = chunk.position - at
            parts.append(cut_marker(missing) if at == 0 else skip_marker(missing))
        if not chunk.closing:
            parts.append(chunk.text)
        at = chunk.end
    return "".join(parts)


async def watch(
    store: Store,
    wakeups: Wakeups,
    deploy_id: int,
    say: Say,
    draining: asyncio.Event,
    *,
    session: PushSession | None = None,
    until_done: bool = False,
    poll: Callable[[], float],
) -> Deploy | None:
    """Stream a deploy's log to `say` until it ends; return the final record, or None if
    the watcher went away first (unless `until_done`, for callers that need the result).

    New output is looked for when the deploy's runner announces some (in this process, or
    through the registry's notifications) and at least every `poll()` seconds."""
    if await store.get_deploy(deploy_id) is None:
        raise NotFound(f"no deploy #{deploy_id}")
    after, at = 0, 0
    watching = True
    final: Deploy | None = None
    while True:
        try:
            chunks = await store.deploy_log(deploy_id, after, PAGE)
            if len(chunks) < PAGE and final is None:
                # Read when caught up only. Once final, the log is whole: what was not read
                # yet is read (the loop goes on until a page comes back empty).
                deploy = await store.get_deploy(deploy_id)
                if deploy is None or deploy.status.finished:
                    final = deploy
                    if deploy is None:
                        raise NotFound(f"no deploy #{deploy_id}")
                    continue
            reachable = True
        except StoreUnavailable:
            chunks, reachable = [], False
        if chunks:
            text = text_for(chunks, at)
            after, at = chunks[-1].seq, chunks[-1].end
            if watching and text:
                watching = await deliver(say, text, draining)
                if not watching and not until_done:
                    return None
            if len(chunks) == PAGE or final is not None:
                continue  # more to read now
        if final is not None:
            return final
        waits: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(wakeups.wait(deploy_id, poll() if reachable else RETRY))
        }
        if session is not None and not until_done:
            waits.add(asyncio.ensure_future(session.detached.wait()))
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for other in pending:
            other.cancel()
        if session is not None and not until_done and session.detached.is_set():
            return None


async def deliver(say: Say, text: str, draining: asyncio.Event) -> bool:
    """Give text to a watcher; False if it is gone or does not read (dropped after
    WATCHER_STALL seconds, or DRAIN_STALL once the gateway drains).

    Called for every watcher on every flush, so it costs one timer and no task: the write
    is looked at every DRAIN_STALL seconds while it waits (a write that completes at once,
    the usual case, is never looked at)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    check: asyncio.TimerHandle | None = None

    def recheck(limit: asyncio.Timeout) -> None:
        nonlocal check
        if draining.is_set() or loop.time() - started >= WATCHER_STALL:
            limit.reschedule(loop.time())
            check = None
        else:
            check = loop.call_later(DRAIN_STALL, recheck, limit)

    try:
        async with asyncio.timeout(None) as limit:
            check = loop.call_later(DRAIN_STALL, recheck, limit)
            await say(text)
    except TimeoutError:
        log.info("event=watcher_dropped reason=not_reading")
        return False
    except Exception:
        return False  # the watcher is gone
    finally:
        if check is not None:
            check.cancel()
    return True
