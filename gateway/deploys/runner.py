"""The deploys this process runs: queueing them, claiming them from the queue every gateway
process shares, running each through its pipeline, and the lease that fences this process.

The queue lives in the registry, shared by every gateway process on every node: each claims
what it may run (one deploy per app across all of them, `max_parallel` per node name), renews
a lease while it lives, and declares gone the processes whose lease lapsed (their running
deploys become interrupted). Deploys run in the gateway, never in the hook process: a
pusher's Ctrl-C only stops the watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .. import executors
from ..config import Config
from ..domain.deploylog import DeployLog
from ..errors import GatewayError, StoreUnavailable
from ..git.repos import Repositories
from ..logs import q
from ..metrics import Metrics
from ..models import Deploy, DeployStatus, NewDeploy
from ..store import Store, utcnow
from . import messages, pipelines
from .lease import Lease
from .legacylogs import import_legacy_logs
from .outcome import Outcome
from .queue import QUEUE, Job, Wakeups
from .reports import Reports

log = logging.getLogger("gateway.deploys")

# How often a process looks at the registry for news nobody announced to it: other processes'
# changes on SQLite (several workers or nodes on one file), or while PostgreSQL's notifications
# are not heard; when they are, only as a safety net.
POLL_INTERVAL = 0.5
POLL_INTERVAL_HEARING = 5.0
FINISH_RETRY = 1.0  # seconds between attempts to record a deploy's end while the registry is away


def node_id(node_name: str = "") -> str:
    """This process's name in the registry's nodes table, unique per start; deploys record
    it as their runner, so it starts with the machine's name as configured ([cluster]
    node_name), else its host name."""
    name = (node_name or socket.gethostname().split(".")[0])[:63] or "gateway"
    return f"{name}-{os.getpid()}-{secrets.token_hex(4)}"


class Runner:
    """Queue, claim and run deploys; keep this process's lease, and fence it when it lapses."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        repos: Repositories,
        git: str,
        wakeups: Wakeups,
        draining: asyncio.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.repos = repos
        self.git = git
        self.wakeups = wakeups
        self.draining = draining  # set when the gateway drains: claim only what is watched here
        self.metrics: Metrics | None = None
        self.node = node_id(config().cluster.node_name)
        self.node_name = config().cluster.node_name or socket.gethostname()
        self.jobs: dict[int, Job] = {}  # the deploys this process runs
        # Gated pushes waiting in this process: their quarantine lives with the push.
        self.gated: dict[int, tuple[Path, str]] = {}
        # Deploys whose pusher waits on this process (attached, gated): a draining gateway
        # still runs those, so that it does not hold its drain for nothing.
        self.watched_here: set[int] = set()
        self.reports = Reports(config, store, wakeups, self.jobs, self.poll_interval)
        self.lease = Lease(
            config,
            store,
            self.node,
            self.node_name,
            wakeups,
            stop_all=self._stop_all,
            check_cancels=self._check_cancels,
            interrupted=self._interrupted,
            running=lambda: len(self.jobs),
        )
        self.closing = False
        self._loops: list[asyncio.Task[None]] = []

    # -- lifecycle --

    async def start(self) -> None:
        """Join the processes sharing the queue: register, take in the log files of earlier
        versions, interrupt the deploys nobody runs any more, then claim and renew."""
        self.store.subscribe(self._heard)
        await self.lease.join()
        settings = self.config().deploy
        await import_legacy_logs(self.store, settings.log_dir, settings.log_limit)
        # Running deploys with no registered runner at all (a version before the shared
        # queue, or a process that left without ending them) can be ended at once.
        for deploy in await self.store.expire_nodes(10.0**9):
            self._interrupted(deploy)
        await self.store.start_listening()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="deploy-claims"),
            asyncio.create_task(self.lease.loop(), name="deploy-lease"),
        ]
        log.info(
            "event=deploy_node_started node=%s name=%s node_timeout=%s",
            self.node,
            q(self.node_name),
            self.config().cluster.node_timeout,
        )

    async def close(self) -> None:
        """Stop running pipelines (recorded as interrupted) and leave; queued deploys wait
        in the registry for whichever process claims them next."""
        self.closing = True
        for loop_task in self._loops:
            loop_task.cancel()
        self._stop_all("the gateway stopped")
        for job in list(self.jobs.values()):
            if job.task is not None:
                with contextlib.suppress(BaseException):
                    await job.task
        for loop_task in self._loops:
            with contextlib.suppress(BaseException):
                await loop_task
        with contextlib.suppress(GatewayError):
            await self.store.leave_node(self.node)

    @property
    def fenced(self) -> bool:
        return self.lease.fenced

    def _stop_all(self, reason: str) -> None:
        for job in list(self.jobs.values()):
            self.stop(job, DeployStatus.INTERRUPTED, reason)

    def poll_interval(self) -> float:
        return POLL_INTERVAL_HEARING if self.store.hears_others else POLL_INTERVAL

    def _heard(self, kind: str, deploy_id: int) -> None:
        """A deploy changed (here, or in another process that the registry told us of)."""
        if kind in ("queue", "done"):
            self.wakeups.fire(QUEUE)
        if kind == "cancel" and deploy_id in self.jobs:
            asyncio.get_running_loop().create_task(self._check_cancels())
        if deploy_id:
            self.wakeups.fire(deploy_id)

    def _interrupted(self, deploy: Deploy) -> None:
        log.warning(
            "event=deploy_interrupted deploy=%d app=%s reason=%s",
            deploy.id,
            deploy.app_name,
            q(deploy.reason),
        )

    async def _check_cancels(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            for deploy_id, reason in await self.store.cancel_requests(self.node):
                job = self.jobs.get(deploy_id)
                if job is not None:
                    self.stop(job, DeployStatus.CANCELLED, reason)

    # -- queueing --

    async def queue(self, new: NewDeploy, gated: tuple[Path, str] | None = None) -> Deploy:
        """Queue a deploy; a gated one (its quarantine, and the old value the branch must
        still have) waits for this process to claim it."""
        queued = await self.store.queue_deploy(new, origin=self.node if gated is not None else None)
        deploy = queued.deploy
        if gated is not None:
            self.gated[deploy.id] = gated
            self.wakeups.fire(QUEUE)
        for older in queued.superseded:
            self.gated.pop(older, None)
            log.info(
                "event=deploy_superseded deploy=%d by=%d app=%s", older, deploy.id, deploy.app_name
            )
        log.info(
            "event=deploy_queued deploy=%d app=%s sha=%s pusher=%s mode=%s",
            deploy.id,
            deploy.app_name,
            messages.short(new.new_sha),
            deploy.pusher,
            deploy.mode,
        )
        return deploy

    def cancel_here(self, deploy_id: int, reason: str) -> None:
        """Stop the deploy if it runs here; forget its quarantine if it waits here."""
        job = self.jobs.get(deploy_id)
        if job is not None:
            self.stop(job, DeployStatus.CANCELLED, reason)
        self.gated.pop(deploy_id, None)

    # -- claiming and running --

    async def _claim_loop(self) -> None:
        while not self.closing:
            try:
                while not self.closing and not self.fenced:
                    # A draining gateway takes only the deploys its own pushers wait for:
                    # the others, or its successor, take the rest.
                    only = sorted(self.watched_here) if self.draining.is_set() else None
                    if only == []:
                        break
                    deploy = await self.store.claim_deploy(
                        self.node, self.node_name, self.config().deploy.max_parallel, only=only
                    )
                    if deploy is None:
                        break
                    self._start(deploy)
                await self._measure_queue()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("event=deploy_claim_error")
            await self.wakeups.wait(QUEUE, self.poll_interval())

    async def _measure_queue(self) -> None:
        """The queue's length and its oldest deploy's wait, for the metrics (one indexed read,
        at most once per claim pass)."""
        if self.metrics is None:
            return
        count, oldest = await self.store.queue_stats()
        self.metrics.deploys_queued.set(count)
        waited = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
        self.metrics.deploy_queue_oldest.set(waited)

    def _start(self, deploy: Deploy) -> None:
        config = self.config()
        gated = self.gated.pop(deploy.id, None)
        job = Job(
            deploy,
            config.deploy_for(deploy.app_name),
            DeployLog(self.store, deploy.id, config.deploy.log_limit),
            asyncio.get_running_loop().create_future(),
            gated[0] if gated else None,
            gated[1] if gated else None,
        )
        job.started = time.monotonic()
        self.jobs[deploy.id] = job
        job.task = asyncio.create_task(self._run(job), name=f"deploy-{deploy.id}")

    def stop(self, job: Job, status: DeployStatus, reason: str) -> None:
        """Stop a running deploy: it ends with this status and reason (the first given)."""
        if job.stop is None:
            job.stop = (status, reason)
        if job.pipeline is not None:
            job.pipeline.cancel()

    async def _run(self, job: Job) -> None:
        if self.metrics is not None:
            self.metrics.deploys_running.inc()
        try:
            await self._run_job(job)
        except Exception:
            log.exception("event=deploy_crashed deploy=%d", job.deploy.id)
            await self._finish(job, DeployStatus.FAILED, reason="internal error")
        finally:
            if self.metrics is not None:
                self.metrics.deploys_running.dec()
            self.jobs.pop(job.deploy.id, None)
            if not job.done.done():
                job.done.set_result(job.deploy)
            self.wakeups.fire(QUEUE)

    async def _run_job(self, job: Job) -> None:
        deploy = job.deploy
        log.info(
            "event=deploy_started deploy=%d app=%s node=%s", deploy.id, deploy.app_name, self.node
        )
        if deploy.pipeline not in pipelines.KINDS:
            # No CHECK in the registry lists the kinds any more: this is where they are checked.
            log.error(
                "event=deploy_unknown_pipeline deploy=%d app=%s kind=%s",
                deploy.id,
                deploy.app_name,
                q(deploy.pipeline),
            )
            reason = f"unknown deploy pipeline kind {deploy.pipeline!r} on this gateway"
            await self._finish(job, DeployStatus.FAILED, reason=reason)
            return
        pipeline = pipelines.chosen(job.settings)
        if pipeline is None:
            await self._finish(job, DeployStatus.CANCELLED, reason="no deploy pipeline any more")
            return
        if deploy.mode == "gate" and job.quarantine is None:
            await self._finish(
                job, DeployStatus.INTERRUPTED, reason="the gated push was lost with its gateway"
            )
            return
        job.log.write(
            f"----> deploy #{deploy.id} of {deploy.app_name}: {deploy.branch} "
            f"{messages.short(deploy.new_sha)} ({deploy.subject}) pushed by {deploy.pusher}\n"
        )
        if job.expected_old is not None:
            current = await executors.run(self.repos.read_ref, deploy.app_name, deploy.ref)
            if (current or "0" * len(deploy.new_sha)) != job.expected_old:
                await self._finish(
                    job,
                    DeployStatus.FAILED,
                    reason=f"{deploy.branch} moved while this push waited: fetch and push again",
                )
                return
        if self.closing or job.stop is not None:
            status, reason = job.stop or (DeployStatus.INTERRUPTED, "the gateway stopped")
            await self._finish(job, status, reason=reason)
            return
        job.pipeline = asyncio.create_task(pipeline.run(job, self._context(job)))
        done, _ = await asyncio.wait({job.pipeline}, timeout=job.settings.timeout)
        if job.pipeline not in done:
            if job.stop is None:
                job.stop = (
                    DeployStatus.TIMED_OUT,
                    f"timed out after {messages.duration_text(job.settings.timeout)}",
                )
            job.pipeline.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({job.pipeline})
        if job.stop is not None:
            status, reason = job.stop
            await self._finish(job, status, reason=reason)
        elif job.pipeline.exception() is not None:
            exc = job.pipeline.exception()
            log.error("event=deploy_error deploy=%d error=%s", deploy.id, q(repr(exc)))
            job.log.write(f"deploy error: {exc}\n")
            await self._finish(job, DeployStatus.FAILED, reason=f"deploy error: {exc}")
        else:
            outcome = job.pipeline.result()
            await self._finish(
                job, outcome.status, exit_code=outcome.exit_code, reason=outcome.reason
            )

    def _context(self, job: Job) -> pipelines.Context:
        """What this deploy's pipeline may use."""
        deploy_id = job.deploy.id

        async def wait_for_report() -> Outcome:
            return await self.reports.wait_for_report(deploy_id)

        return pipelines.Context(
            log=job.log,
            config=self.config(),
            repos=self.repos,
            git=self.git,
            records=self.store,
            metrics=self.metrics,
            status_base_url=self.reports.status_base_url(),
            wait_for_report=wait_for_report,
        )

    async def _finish(
        self,
        job: Job,
        status: DeployStatus,
        *,
        exit_code: int | None = None,
        reason: str = "",
    ) -> None:
        """Store the rest of the log with the final line, then the final status (a watcher
        that sees the status has the whole log), retrying while the registry is away."""
        deploy = job.deploy
        elapsed = time.monotonic() - job.started if job.started is not None else None
        duration_ms = None if elapsed is None else int(elapsed * 1000)
        final = dataclasses.replace(
            deploy, status=status, exit_code=exit_code, reason=reason, duration_ms=duration_ms
        )
        await job.log.close(f"----> deploy #{deploy.id} {messages.describe(final, elapsed)}\n")
        # The end must be recorded, or the app's queue would wait behind it for ever: retry
        # whatever fails, as long as this process lives (if it stops first, it leaves the
        # nodes table and the others interrupt the deploy).
        delay = FINISH_RETRY
        while True:
            try:
                ended = await self.store.finish_deploy(
                    deploy.id,
                    status,
                    utcnow(),
                    exit_code=exit_code,
                    reason=reason,
                    duration_ms=duration_ms,
                )
                break
            except Exception as exc:
                log.error("event=deploy_end_not_recorded deploy=%d error=%s", deploy.id, q(exc))
                if self.closing:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        recorded = await self.store.get_deploy(deploy.id)
        if recorded is not None:
            final = recorded
        if self.metrics is not None and ended:
            self.metrics.deploy_done(final.status.value, elapsed)
        if not job.done.done():
            job.done.set_result(final)
        log.info(
            "event=deploy_finished deploy=%d app=%s status=%s exit_code=%s reason=%s duration=%s",
            deploy.id,
            deploy.app_name,
            final.status.value,
            exit_code,
            q(final.reason),
            f"{elapsed:.3f}" if elapsed is not None else "-",
        )
