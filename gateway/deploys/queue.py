"""Deploy jobs and their queues: one deploy at a time per app, `max_parallel` across apps,
and a newer push supersedes what still waits."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DeploySettings
from ..deploylog import DeployLog
from ..models import Deploy, DeployStatus
from .outcome import Outcome

log = logging.getLogger("gateway.deploys")


@dataclass
class Job:
    deploy: Deploy
    settings: DeploySettings
    log: DeployLog
    done: asyncio.Future[Deploy]
    quarantine: Path | None = None
    expected_old: str | None = None  # gate mode: the branch must still be here when we run
    task: asyncio.Task[Outcome] | None = None
    stop: tuple[DeployStatus, str] | None = None  # why the running pipeline was stopped
    started: float | None = None
    elapsed: float | None = None
    report: asyncio.Future[Outcome] | None = None  # webhook: receiver's status


@dataclass
class AppQueue:
    pending: deque[Job] = field(default_factory=deque)
    running: Job | None = None
    worker: asyncio.Task[None] | None = None


class Slots:
    """At most `limit` deploys at once across apps; the limit follows a reload."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed: asyncio.Condition | None = None

    @property
    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created on first use, inside the running loop
            self._changed = asyncio.Condition()
        return self._changed

    @property
    def full(self) -> bool:
        return self.used >= self.limit

    async def acquire(self) -> None:
        async with self._condition:
            await self._condition.wait_for(lambda: self.used < self.limit)
            self.used += 1

    async def release(self) -> None:
        async with self._condition:
            self.used -= 1
            self._condition.notify_all()

    async def resize(self, limit: int) -> None:
        async with self._condition:
            self.limit = limit
            self._condition.notify_all()


Run = Callable[[Job], Awaitable[None]]
Supersede = Callable[[Job, Job], Awaitable[None]]


class Queues:
    """The per-app queues and the workers that drain them."""

    def __init__(self, slots: Slots, run: Run, supersede: Supersede) -> None:
        self.slots = slots
        self._run = run
        self._supersede = supersede
        self.by_app: dict[str, AppQueue] = {}
        self.closing = False

    async def add(self, job: Job) -> None:
        queue = self.by_app.setdefault(job.deploy.app_name, AppQueue())
        # A newer push supersedes what is still waiting: only the latest code is worth deploying.
        while queue.pending:
            await self._supersede(queue.pending.popleft(), job)
        queue.pending.append(job)
        if queue.worker is None or queue.worker.done():
            queue.worker = asyncio.create_task(self._worker(queue))

    def withdraw(self, job: Job) -> bool:
        """Take a job out of its queue if it has not started; True if it was waiting."""
        queue = self.by_app.get(job.deploy.app_name)
        if queue is not None and job in queue.pending:
            queue.pending.remove(job)
            return True
        return False

    def running(self, app: str) -> Job | None:
        queue = self.by_app.get(app)
        return queue.running if queue is not None else None

    def workers(self) -> list[asyncio.Task[None]]:
        return [q.worker for q in self.by_app.values() if q.worker is not None]

    async def _worker(self, queue: AppQueue) -> None:
        while queue.pending and not self.closing:
            await self.slots.acquire()
            try:
                if not queue.pending or self.closing:
                    return
                job = queue.pending.popleft()
                queue.running = job
                try:
                    await self._run(job)
                finally:
                    queue.running = None
            finally:
                await self.slots.release()
