"""Ending what still runs at a stop: a grace period, then cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def end(tasks: Iterable[asyncio.Future[Any]], grace: float) -> None:
    """Give `tasks` `grace` seconds to end on their own, then cancel the rest and wait for
    them (a cancelled git session terminates its process)."""
    running = {task for task in tasks if not task.done()}
    if not running:
        return
    _, left = await asyncio.wait(running, timeout=grace)
    for task in left:
        task.cancel()
    for task in left:
        with contextlib.suppress(BaseException):
            await task
