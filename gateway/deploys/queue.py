"""A deploy this process runs (Job), and the wake-ups its loops and watchers wait on."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..config import DeploySettings
from ..domain.deploylog import DeployLog
from ..models import Deploy, DeployStatus
from .outcome import Outcome

# The key the claiming loop waits on: the queue changed somewhere.
QUEUE = 0


@dataclass
class Job:
    """A deploy claimed by this process, while it runs here."""

    deploy: Deploy
    settings: DeploySettings
    log: DeployLog
    done: asyncio.Future[Deploy]
    quarantine: Path | None = None
    expected_old: str | None = None  # gate mode: the branch must still be here when we run
    task: asyncio.Task[None] | None = None
    stop: tuple[DeployStatus, str] | None = None  # why the running pipeline was stopped
    started: float | None = None
    pipeline: asyncio.Task[Outcome] | None = None


class Wakeups:
    """Who waits for news of a deploy (or of the queue, key QUEUE): `fire` wakes them all;
    a waiter also wakes after its timeout, as news may come from where nobody announces."""

    def __init__(self) -> None:
        self._waiting: dict[int, set[asyncio.Future[None]]] = {}

    def fire(self, key: int) -> None:
        for waiter in self._waiting.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, key: int, within: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(key, set())
        waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, within)
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiting.get(key) is waiters:
                del self._waiting[key]
