"""Watching a deploy: its log streamed to a pusher or a `logs --follow`, never at the cost of
the gateway's memory or of a drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..models import Deploy
from .pushes import PushSession
from .queue import Job

log = logging.getLogger("gateway.deploys")

Say = Callable[[str], Awaitable[None]]

# A watcher that cannot take the next piece of a deploy's output within this many seconds
# is dropped (the deploy goes on); once the gateway drains, within DRAIN_STALL.
WATCHER_STALL = 60.0
DRAIN_STALL = 2.0


async def watch(
    job: Job,
    say: Say,
    draining: asyncio.Event,
    session: PushSession | None = None,
    until_done: bool = False,
) -> Deploy | None:
    """Stream the job's log to `say` until it ends; return the final record, or None if
    the watcher went away first (unless `until_done`, for callers that need the result).

    The watcher's buffer is bounded (see DeployLog.subscribe): one that stops reading
    skips ahead with a marker rather than holding the deploy's output in memory."""
    watching = True
    with job.log.subscribe() as subscription:
        while True:
            reader = asyncio.ensure_future(subscription.next())
            waits: set[asyncio.Future[Any]] = {reader}
            if session is not None and not until_done:
                waits.add(asyncio.ensure_future(session.detached.wait()))
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for other in pending:
                other.cancel()
            if reader not in done:
                return None
            text = reader.result()
            if text is None:
                break
            if watching:
                watching = await deliver(say, text, draining)
                if not watching and not until_done:
                    return None
    return await job.done


async def deliver(say: Say, text: str, draining: asyncio.Event) -> bool:
    """Give text to a watcher; False if it is gone or does not read (dropped after
    WATCHER_STALL seconds, or DRAIN_STALL once the gateway drains)."""
    loop = asyncio.get_running_loop()
    writing = asyncio.ensure_future(say(text))
    deadline = loop.time() + WATCHER_STALL
    draining = asyncio.ensure_future(draining.wait())
    try:
        while not writing.done():
            waits: set[asyncio.Future[Any]] = {writing}
            if draining.done():
                deadline = min(deadline, loop.time() + DRAIN_STALL)
            else:
                waits.add(draining)
            timeout = deadline - loop.time()
            if timeout <= 0:
                writing.cancel()
                with contextlib.suppress(BaseException):
                    await writing
                log.info("event=watcher_dropped reason=not_reading")
                return False
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        draining.cancel()
    return not writing.cancelled() and writing.exception() is None
