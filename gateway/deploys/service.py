"""Deploys as the front ends see them (SSH commands, the API, the control socket, the CLI):
submit, follow, cancel (the one audited cancel), and the gateway's start and stop of them.

Behind it, each seam in its own module: `runner` (queue, claims, running a deploy through its
pipeline) with `lease` (this process's lease, fencing), `push` (the hooks' requests: gate,
attached and detached), `reports` (webhook receivers' status reports), `pipelines/` (what a
deploy runs: one module per kind) and `messages` (what pushers and operators read).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from ..config import Config, DeploySettings, Settings
from ..domain import audit
from ..domain.deploylog import read_log
from ..errors import Conflict, GatewayError, NotFound
from ..git.repos import Repositories
from ..metrics import Metrics
from ..models import App, Deploy, DeployStatus, Identity
from ..store import AuditTrail, Store, utcnow
from . import messages, pipelines
from .fanout import LogReaders
from .push import PushHandler
from .pushes import Peer, PushSession, RefUpdate
from .queue import QUEUE, Job, Wakeups
from .runner import Runner
from .watch import Say, deliver


class DeployService:
    """The deploy facade; the work is done by the runner, the push handler and the reports."""

    def __init__(
        self, config: Config | Settings, store: Store, repos: Repositories, git: str = "git"
    ) -> None:
        # The running gateway's Settings, read at use: a reload reaches new deploys, deploy
        # messages and webhooks at once (a plain Config for tests and one-off tools).
        self.settings = config if isinstance(config, Settings) else Settings(config)
        self.store = store
        self.repos = repos
        self.git = git
        self.wakeups = Wakeups()
        # Set when the gateway drains: watchers that do not read are dropped quickly then.
        self.draining = asyncio.Event()
        self.runner = Runner(self._current, store, repos, git, self.wakeups, self.draining)
        self.reports = self.runner.reports
        # Watchers of one deploy share one reader of its log (issue 20: one per watcher,
        # reading on every flush, slowed every tenant).
        self.readers = LogReaders(
            store, self.wakeups, self.runner.poll_interval, lambda: self.config.deploy.log_limit
        )
        self.push = PushHandler(
            self._current, store, repos, self.runner, self.readers, self.draining
        )
        self.pushes = self.push.sessions

    def _current(self) -> Config:
        return self.settings.current

    @property
    def config(self) -> Config:
        return self.settings.current

    @property
    def metrics(self) -> Metrics | None:
        return self.runner.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self.runner.metrics = metrics

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where this node's HTTP endpoint listens (receivers' reports go there)."""
        return self.reports.http_address

    @http_address.setter
    def http_address(self, address: tuple[str, int] | None) -> None:
        self.reports.http_address = address

    @property
    def node(self) -> str:
        """This process's row in the registry's nodes table."""
        return self.runner.node

    def advertise(self, address: str | None) -> None:
        """Where the other nodes reach this one's internal listener (registered at start)."""
        self.runner.lease.address = address

    @property
    def jobs(self) -> dict[int, Job]:
        """The deploys this process runs."""
        return self.runner.jobs

    # -- lifecycle --

    async def start(self) -> None:
        await self.runner.start()

    async def close(self) -> None:
        """Stop running pipelines (recorded as interrupted) and leave; queued deploys wait
        in the registry for whichever process claims them next."""
        await self.runner.close()
        await self.readers.close()
        await pipelines.close()

    async def reconfigure(self) -> None:
        """After a reload (the settings are read at use): a raised max_parallel claims
        waiting deploys at once."""
        self.wakeups.fire(QUEUE)

    # -- pushes --

    async def open_session(
        self, identity: Identity, app: App, conn_id: str, peer: str = "-"
    ) -> PushSession:
        return await self.push.open_session(identity, app, conn_id, peer)

    def close_session(self, session: PushSession) -> None:
        self.push.close_session(session)

    async def handle_hook(self, request: dict[str, Any], say: Say, peer: Peer | None) -> int:
        return await self.push.handle_hook(request, say, peer)

    async def submit(
        self,
        session: PushSession,
        update: RefUpdate,
        settings: DeploySettings,
        quarantine: Path | None = None,
        expected_old: str | None = None,
    ) -> Deploy:
        """Queue a deploy of this push; a gated one waits for this process to claim it."""
        return await self.push.submit(session, update, settings, quarantine, expected_old)

    # -- following --

    async def follow(self, deploy_id: int, say: Say) -> Deploy:
        """Print a deploy's log; if it is still queued or running, stream it to the end,
        wherever it runs."""
        final = await self.readers.watch(deploy_id, say, self.draining, until_done=True)
        if final is None:  # pragma: no cover - until_done waits for the end
            raise NotFound(f"no deploy #{deploy_id}")
        await deliver(say, messages.final_line(self.config, final, final.elapsed), self.draining)
        return final

    async def wait_done(self, deploy_id: int) -> Deploy:
        """The deploy's final record, once it has one."""
        while True:
            deploy = await self.store.get_deploy(deploy_id)
            if deploy is None:
                raise NotFound(f"no deploy #{deploy_id}")
            if deploy.status.finished:
                return deploy
            await self.wakeups.wait(deploy_id, self.runner.poll_interval())

    async def log_text(self, deploy_id: int) -> str:
        """What is kept of a deploy's log so far (live if it is running)."""
        return await read_log(self.store, deploy_id)

    # -- cancelling --

    async def cancel(
        self, deploy_id: int, by: str, *, fingerprint: str = "", source: str = ""
    ) -> Deploy:
        """Stop a deploy wherever it runs, and audit who asked; its final record once it has
        ended. Every front end's cancel comes here (the offline CLI: `cancel_offline`)."""
        final = await self._cancel(deploy_id, by)
        await audit_cancel(self.store, final, by, fingerprint=fingerprint, source=source)
        return final

    async def _cancel(self, deploy_id: int, by: str) -> Deploy:
        before = await self.store.get_deploy(deploy_id)
        if before is None:
            raise NotFound(f"no deploy #{deploy_id}")
        if before.status.finished:
            raise Conflict(f"deploy #{deploy_id} already ended: {before.status.value}")
        await self.store.request_cancel(deploy_id, f"cancelled by {by}")
        self.runner.cancel_here(deploy_id, f"cancelled by {by}")
        return await self.wait_done(deploy_id)

    async def cancel_app(self, app: str, by: str) -> int:
        """Cancel every queued and running deploy of an app (it is being removed): the
        waiting ones first, so that none of them starts. The removal is what is audited."""
        try:
            records = await self.store.list_deploys(app, limit=1000)
        except NotFound:
            return 0
        open_ones = [d for d in records if not d.status.finished]
        open_ones.sort(key=lambda d: d.status is DeployStatus.RUNNING)
        for deploy in open_ones:
            with contextlib.suppress(GatewayError):
                await self._cancel(deploy.id, by)
        return len(open_ones)

    # -- webhook receivers' status reports --

    async def report(
        self, deploy_id: int, text: str | None, status: DeployStatus | None, exit_code: int | None
    ) -> str:
        """A receiver's report: "ok", "not waiting" or "slow down" (see Reports.report)."""
        return await self.reports.report(deploy_id, text, status, exit_code)


async def audit_cancel(
    store: AuditTrail, deploy: Deploy, actor: str, *, fingerprint: str = "", source: str = ""
) -> None:
    """The audit trail's record of a cancel, whichever front end asked for it."""
    await audit.record(
        store,
        "deploy_cancelled",
        actor=actor,
        fingerprint=fingerprint,
        source=source,
        app=deploy.app_name,
        deploy=deploy.id,
    )


async def cancel_offline(store: Store, deploy_id: int, *, actor: str) -> Deploy:
    """Cancel a deploy with no gateway on this machine to ask (the CLI): a queued one is
    cancelled in the registry; a running one is marked for the gateway running it (another
    node), or, if none runs it any more, recorded as cancelled. Audited like `cancel`."""
    deploy = await store.get_deploy(deploy_id)
    if deploy is None:
        raise NotFound(f"no deploy #{deploy_id}")
    if deploy.status.finished:
        raise Conflict(f"deploy #{deploy.id} already ended: {deploy.status.value}")
    after = await store.request_cancel(deploy.id, f"cancelled by {actor}")
    if after is not None and after.status is DeployStatus.RUNNING:
        alive = {node.id for node in await store.list_nodes()}
        if after.runner not in alive:
            await store.finish_deploy(
                deploy.id, DeployStatus.CANCELLED, utcnow(), reason=f"cancelled by {actor}"
            )
    await audit_cancel(store, deploy, actor)
    final = await store.get_deploy(deploy.id)
    if final is None:
        raise NotFound(f"no deploy #{deploy_id}")
    return final
