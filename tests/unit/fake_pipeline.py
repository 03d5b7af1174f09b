"""A deploy pipeline for unit tests, and a DeployService around it on a real SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.config import DeploySettings
from gateway.deploys import pipelines
from gateway.deploys.outcome import Outcome
from gateway.deploys.queue import QUEUE, Job
from gateway.deploys.service import DeployService
from gateway.git.repos import Repositories
from gateway.models import App, Deploy, DeployStatus, NewDeploy
from gateway.store import Store, open_store

SHA = "a" * 40
ZERO = "0" * 40


class FakePipeline:
    """Chosen whenever a command is configured; runs until `release` is set (if given)."""

    kind = "fake"

    def __init__(self) -> None:
        self.outcome = Outcome(DeployStatus.SUCCEEDED, 0)
        self.error: Exception | None = None
        self.release: asyncio.Event | None = None
        self.runs: list[int] = []
        self.contexts: list[pipelines.Context] = []
        self.cancelled: list[int] = []
        self.started = asyncio.Event()

    def configured(self, settings: DeploySettings) -> bool:
        return bool(settings.command)

    async def run(self, job: Job, context: pipelines.Context) -> Outcome:
        self.runs.append(job.deploy.id)
        self.contexts.append(context)
        context.log.write(f"fake pipeline ran #{job.deploy.id}\n")
        self.started.set()
        try:
            if self.release is not None:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job.deploy.id)
            raise
        if self.error is not None:
            raise self.error
        return self.outcome

    async def close(self) -> None:
        pass


def make_config(tmp_path: Path, **deploy: Any) -> config.Config:
    cluster = {"node_timeout": deploy.pop("node_timeout", 15)}
    return config.from_mapping(
        {
            "storage": {
                "repos": str(tmp_path / "repos"),
                "database": str(tmp_path / "gw.db"),
                "control_socket": str(tmp_path / "gw.sock"),
            },
            "deploy": {
                "command": ["fake"],
                "log_dir": str(tmp_path / "deploys"),
                "build_dir": str(tmp_path / "builds"),
                **deploy,
            },
            "cluster": cluster,
        }
    )


@dataclass
class Rig:
    service: DeployService
    fake: FakePipeline
    store: Store
    repos: Repositories
    app: App
    tmp_path: Path

    async def queue(self, app: App | None = None, mode: str = "attached") -> Deploy:
        app = app or self.app
        new = NewDeploy(app.id, "refs/heads/main", ZERO, SHA, "alice", "SHA256:x", "s", "a",
                        mode, "fake")  # fmt: skip
        return await self.service.runner.queue(new)

    async def done(self, deploy_id: int) -> Deploy:
        return await asyncio.wait_for(self.service.wait_done(deploy_id), 10)

    def configure(self, **deploy: Any) -> None:
        # As a reload does: the service reads its settings at use.
        self.service.settings.reload(make_config(self.tmp_path, **deploy))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll with a deadline (for states nothing announces)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def claims_idle(service: DeployService) -> None:
    """Until the claim loop has finished a pass and waits for news of the queue."""
    await until(lambda: QUEUE in service.wakeups._waiting)


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, start: bool = True, **deploy: Any
) -> AsyncIterator[Rig]:
    fake = FakePipeline()
    monkeypatch.setattr(pipelines, "KINDS", {"fake": fake})
    cfg = make_config(tmp_path, **deploy)
    store = await open_store(tmp_path / "gw.db")
    repos = Repositories(tmp_path / "repos", 1 << 20)
    await store.create_user("alice")
    app = await store.create_app("web", "alice", "main")
    service = DeployService(cfg, store, repos)
    try:
        if start:
            await service.start()
        yield Rig(service, fake, store, repos, app, tmp_path)
    finally:
        if fake.release is not None:
            fake.release.set()
        await service.close()
        await store.close()
