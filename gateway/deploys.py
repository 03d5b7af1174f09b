"""Deploy orchestration: records, per-app queues, pipelines, timeouts, cancel, recovery.

A push reaches this service through the repository hooks (see hooks.py): `post-receive`
queues a deploy of the deploy branch and, in attached mode, streams its log back; in gate
mode `pre-receive` runs the deploy on the quarantined objects and its result decides
whether the refs move. Deploys run here, in the gateway, never in the hook process: a
pusher's Ctrl-C only stops the watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import audit, pipelines
from .config import Config, DeploySettings
from .deploylog import DeployLog, LogExists, read_log
from .errors import Conflict, GatewayError, NotFound
from .logs import q
from .metrics import Metrics
from .models import App, Deploy, DeployStatus, Identity, NewDeploy
from .repos import Repositories
from .store import Store, utcnow

log = logging.getLogger("gateway.deploys")

Say = Callable[[str], Awaitable[None]]

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_REF = re.compile(r"refs/[A-Za-z0-9._/+@-]{1,250}")


def is_zero(sha: str) -> bool:
    return set(sha) == {"0"}


@dataclass(frozen=True)
class RefUpdate:
    old: str
    new: str
    ref: str


@dataclass
class PushSession:
    """One receive-pack run: who pushes what, as the gateway verified it (hooks only
    present the session's token; they cannot claim an identity)."""

    token: str
    identity: Identity
    app: App
    conn_id: str
    peer: str = "-"
    detached: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False  # an attached deploy of this push did not succeed


@dataclass
class Job:
    deploy: Deploy
    settings: DeploySettings
    log: DeployLog
    done: asyncio.Future[Deploy]
    quarantine: Path | None = None
    expected_old: str | None = None  # gate mode: the branch must still be here when we run
    task: asyncio.Task[pipelines.Outcome] | None = None
    stop: tuple[DeployStatus, str] | None = None  # why the running pipeline was stopped
    started: float | None = None
    elapsed: float | None = None
    report: asyncio.Future[pipelines.Outcome] | None = None  # webhook: receiver's status


@dataclass
class AppQueue:
    pending: deque[Job] = field(default_factory=deque)
    running: Job | None = None
    worker: asyncio.Task[None] | None = None


def pipeline_kind(settings: DeploySettings) -> str | None:
    if settings.command:
        return "command"
    if settings.webhook_url:
        return "webhook"
    return None


def short(sha: str) -> str:
    return sha[:8]


def duration_text(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class DeployService:
    def __init__(self, config: Config, store: Store, repos: Repositories) -> None:
        self.config = config
        self.store = store
        self.repos = repos
        self.metrics: Metrics | None = None  # set by the server
        self.log_dir = config.deploy.log_dir
        self.sessions: dict[str, PushSession] = {}
        self.jobs: dict[int, Job] = {}
        self.queues: dict[str, AppQueue] = {}
        self.semaphore = asyncio.Semaphore(config.deploy.max_parallel)
        self.closing = False
        self.http_address: tuple[str, int] | None = None  # set when the HTTP endpoint listens

    # -- lifecycle --

    async def start(self) -> None:
        """Recover from the previous run: running deploys were interrupted; queued ones run."""
        await asyncio.to_thread(self.log_dir.mkdir, parents=True, exist_ok=True)
        for deploy in await self.store.deploys_in((DeployStatus.RUNNING,)):
            await self.store.finish_deploy(
                deploy.id,
                DeployStatus.INTERRUPTED,
                utcnow(),
                reason="the gateway stopped while this deploy was running",
            )
            log.warning("event=deploy_interrupted deploy=%d app=%s", deploy.id, deploy.app_name)
        for deploy in await self.store.deploys_in((DeployStatus.QUEUED,)):
            app = await self.store.get_app(deploy.app_name)
            if deploy.mode == "gate" or app is None:
                # A gated deploy's objects lived in the quarantine of a push that is gone.
                await self.store.finish_deploy(
                    deploy.id,
                    DeployStatus.INTERRUPTED,
                    utcnow(),
                    reason="the gated push was lost when the gateway stopped",
                )
                continue
            settings = self.config.deploy_for(app.name)
            if pipeline_kind(settings) is None:
                await self.store.finish_deploy(
                    deploy.id,
                    DeployStatus.CANCELLED,
                    utcnow(),
                    reason="no deploy pipeline any more",
                )
                continue
            log.info("event=deploy_resumed deploy=%d app=%s", deploy.id, app.name)
            await self._enqueue(app, deploy, settings, resume=True)

    async def close(self) -> None:
        """Stop running pipelines (recorded as interrupted); queued deploys wait for the next
        start, as recovery promises."""
        self.closing = True
        for job in list(self.jobs.values()):
            if job.task is not None and not job.task.done():
                job.stop = (DeployStatus.INTERRUPTED, "the gateway stopped")
                job.task.cancel()
        workers = [q.worker for q in self.queues.values() if q.worker is not None]
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker
        for job in list(self.jobs.values()):
            job.log.close()

    # -- push sessions, opened by receive-pack and presented by its hooks --

    def open_session(
        self, identity: Identity, app: App, conn_id: str, peer: str = "-"
    ) -> PushSession:
        session = PushSession(secrets.token_urlsafe(24), identity, app, conn_id, peer)
        self.sessions[session.token] = session
        return session

    def close_session(self, token: str) -> None:
        self.sessions.pop(token, None)

    # -- hooks --

    async def handle_hook(self, request: dict[str, Any], say: Say) -> int:
        hook = request.get("hook")
        gate = hook == "pre-receive"
        session = self.sessions.get(str(request.get("token", "")))
        if session is None or hook not in ("pre-receive", "post-receive"):
            log.warning("event=hook_refused hook=%s reason=unknown_session", q(hook))
            await say("gateway: this push is not known to the gateway\n")
            return 1 if gate else 0
        try:
            updates = [_parse_update(u) for u in request.get("updates", [])]
        except ValueError as exc:
            log.warning("event=hook_refused hook=%s reason=%s", hook, q(exc))
            return 1 if gate else 0
        if gate:
            return await self._pre_receive(session, updates, request.get("quarantine"), say)
        # post-receive lists exactly the refs this push changed: the audit trail's push record.
        await audit.record(
            self.store,
            "push",
            actor=session.identity.user_name,
            fingerprint=session.identity.fingerprint,
            source=session.peer,
            app=session.app.name,
            updates=[f"{u.ref} {u.old[:12]}..{u.new[:12]}" for u in updates],
        )
        return await self._post_receive(session, updates, say)

    def _deploy_ref(self, app: App) -> str:
        return f"refs/heads/{app.deploy_branch}"

    async def _pre_receive(
        self, session: PushSession, updates: list[RefUpdate], quarantine: Any, say: Say
    ) -> int:
        app = session.app
        settings = self.config.deploy_for(app.name)
        if settings.mode != "gate" or pipeline_kind(settings) is None:
            return 0
        update = next(
            (u for u in updates if u.ref == self._deploy_ref(app) and not is_zero(u.new)), None
        )
        if update is None:
            return 0
        try:
            path = self.repos.quarantine_path(app.name, str(quarantine)) if quarantine else None
        except GatewayError as exc:
            log.warning("event=hook_refused app=%s reason=%s", app.name, q(exc))
            await say("gateway: cannot read the pushed objects; push refused\n")
            return 1
        job = await self.submit(session, update, settings, quarantine=path, expected_old=update.old)
        await say(
            f"deploy #{job.deploy.id} of {app.name} ({app.deploy_branch} {short(update.new)}): "
            "gate mode, the branch moves only if this deploy succeeds\n"
        )
        final = await self.watch(job, say, session, until_done=True)
        if final.status.ok:
            await say(
                f"deploy #{final.id} {self.describe(final, job.elapsed)}: "
                f"updating {app.deploy_branch}\n"
            )
            return 0
        await say(
            f"deploy #{final.id} {self.describe(final)}: push rejected, "
            f"{app.deploy_branch} unchanged. Log: {self.logs_command(app.name, final.id)}\n"
        )
        return 1

    async def _post_receive(self, session: PushSession, updates: list[RefUpdate], say: Say) -> int:
        app = session.app
        settings = self.config.deploy_for(app.name)
        kind = pipeline_kind(settings)
        deploy_ref = self._deploy_ref(app)
        not_deployed = []
        for update in updates:
            if update.ref != deploy_ref:
                if update.ref.startswith("refs/heads/") and not is_zero(update.new):
                    not_deployed.append(update.ref.removeprefix("refs/heads/"))
                continue
            if is_zero(update.new):
                await say(f"deploy branch {app.deploy_branch} deleted: nothing deployed\n")
            elif kind is None:
                await say(f"no deploy pipeline is configured for {app.name}: nothing deployed\n")
            elif settings.mode == "gate":
                continue  # deployed before the refs moved, in pre-receive
            elif settings.mode == "detached":
                job = await self.submit(session, update, settings)
                follow = self.logs_command(app.name, job.deploy.id, True)
                await say(
                    f"deploy #{job.deploy.id} of {app.name} queued ({short(update.new)}); "
                    f"the push is done. Follow it: {follow}\n"
                )
            else:
                await self._attached(session, update, settings, say)
        if not_deployed:
            names = ", ".join(f"'{b}'" for b in not_deployed)
            await say(
                f"{names} stored, not deployed: {app.name} deploys '{app.deploy_branch}'. "
                f"To deploy: git push <remote> HEAD:{app.deploy_branch}\n"
            )
        return 0

    async def _attached(
        self, session: PushSession, update: RefUpdate, settings: DeploySettings, say: Say
    ) -> None:
        app = session.app
        job = await self.submit(session, update, settings)
        deploy = job.deploy
        queue = self.queues[app.name]
        if queue.running is not None and queue.running is not job:
            state = f"queued behind #{queue.running.deploy.id}"
        elif self.semaphore.locked():
            state = f"queued: all {self.config.deploy.max_parallel} deploy slots are busy"
        else:
            state = "started"
        lines = [
            f"deploy #{deploy.id} of {app.name} {state}. Ctrl-C stops watching, not the deploy.",
            f"Watch it again with: {self.logs_command(app.name, deploy.id, True)}",
        ]
        await say("".join(f"{line}\n" for line in lines))
        final = await self.watch(job, say, session)
        if final is None:
            return  # the pusher left; the deploy goes on
        if not final.status.ok:
            session.failed = True
        await say(self.final_line(final, job.elapsed))

    # -- queueing and running --

    async def submit(
        self,
        session: PushSession,
        update: RefUpdate,
        settings: DeploySettings,
        quarantine: Path | None = None,
        expected_old: str | None = None,
    ) -> Job:
        app = session.app
        info = await asyncio.to_thread(self.repos.commit_info, app.name, update.new, quarantine)
        deploy = await self.store.create_deploy(
            NewDeploy(
                app_id=app.id,
                ref=update.ref,
                old_sha=update.old,
                new_sha=update.new,
                pusher=session.identity.user_name,
                key_fingerprint=session.identity.fingerprint,
                subject=info.subject,
                author=info.author,
                mode=settings.mode,
                pipeline=pipeline_kind(settings) or "command",
            )
        )
        log.info(
            "event=deploy_queued deploy=%d app=%s sha=%s pusher=%s mode=%s",
            deploy.id,
            app.name,
            short(update.new),
            deploy.pusher,
            deploy.mode,
        )
        return await self._enqueue(app, deploy, settings, quarantine, expected_old)

    async def _enqueue(
        self,
        app: App,
        deploy: Deploy,
        settings: DeploySettings,
        quarantine: Path | None = None,
        expected_old: str | None = None,
        resume: bool = False,
    ) -> Job:
        limit = self.config.deploy.log_limit
        refused = None
        try:
            deploy_log = DeployLog(self.log_dir, deploy.id, limit, resume=resume)
        except LogExists as exc:
            # A file this deploy did not create is never appended to nor shown as its log.
            log.error(
                "event=deploy_log_exists deploy=%d app=%s path=%s moved_to=%s",
                deploy.id,
                app.name,
                exc.path,
                exc.moved_to,
            )
            refused = exc
            deploy_log = DeployLog(self.log_dir, deploy.id, limit)
        job = Job(
            deploy,
            settings,
            deploy_log,
            asyncio.get_running_loop().create_future(),
            quarantine,
            expected_old,
        )
        queue = self.queues.setdefault(app.name, AppQueue())
        if refused is not None:
            await self._finish(job, DeployStatus.FAILED, reason=str(refused))
            return job
        # A newer push supersedes what is still waiting: only the latest code is worth deploying.
        while queue.pending:
            older = queue.pending.popleft()
            await self._finish(
                older,
                DeployStatus.CANCELLED,
                reason=f"superseded by #{deploy.id}",
                superseded_by=deploy.id,
            )
        queue.pending.append(job)
        self.jobs[deploy.id] = job
        if queue.worker is None or queue.worker.done():
            queue.worker = asyncio.create_task(self._app_worker(queue))
        return job

    async def _app_worker(self, queue: AppQueue) -> None:
        """One deploy at a time per app; at most max_parallel across apps."""
        while queue.pending and not self.closing:
            async with self.semaphore:
                if not queue.pending or self.closing:
                    return
                job = queue.pending.popleft()
                queue.running = job
                try:
                    await self._run(job)
                except Exception:
                    log.exception("event=deploy_crashed deploy=%d", job.deploy.id)
                    await self._finish(job, DeployStatus.FAILED, reason="internal error")
                finally:
                    queue.running = None

    async def _run(self, job: Job) -> None:
        deploy = job.deploy
        if not await self.store.start_deploy(deploy.id, utcnow()):
            return
        job.started = time.monotonic()
        if self.metrics is not None:
            self.metrics.deploys_running.inc()
        settings = job.settings
        log.info("event=deploy_started deploy=%d app=%s", deploy.id, deploy.app_name)
        job.log.write(
            f"----> deploy #{deploy.id} of {deploy.app_name}: {deploy.branch} "
            f"{short(deploy.new_sha)} ({deploy.subject}) pushed by {deploy.pusher}\n"
        )
        if job.expected_old is not None:
            current = await asyncio.to_thread(self.repos.read_ref, deploy.app_name, deploy.ref)
            if (current or "0" * len(deploy.new_sha)) != job.expected_old:
                await self._finish(
                    job,
                    DeployStatus.FAILED,
                    reason=f"{deploy.branch} moved while this push waited: fetch and push again",
                )
                return
        if self.closing:
            await self._finish(job, DeployStatus.INTERRUPTED, reason="the gateway stopped")
            return
        job.task = asyncio.create_task(self._pipeline(job))
        done, _ = await asyncio.wait({job.task}, timeout=settings.timeout)
        if job.task not in done:
            job.stop = (
                DeployStatus.TIMED_OUT,
                f"timed out after {duration_text(settings.timeout)}",
            )
            job.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({job.task})
        if job.stop is not None:
            status, reason = job.stop
            await self._finish(job, status, reason=reason)
        elif job.task.exception() is not None:
            exc = job.task.exception()
            log.error("event=deploy_error deploy=%d error=%s", deploy.id, q(repr(exc)))
            job.log.write(f"deploy error: {exc}\n")
            await self._finish(job, DeployStatus.FAILED, reason=f"deploy error: {exc}")
        else:
            outcome = job.task.result()
            await self._finish(
                job, outcome.status, exit_code=outcome.exit_code, reason=outcome.reason
            )

    async def _pipeline(self, job: Job) -> pipelines.Outcome:
        deploy, settings = job.deploy, job.settings
        if pipeline_kind(settings) == "webhook":
            from .webhook import deliver  # only loaded where webhooks are used

            return await deliver(self, job)
        workdir = Path(tempfile.mkdtemp(prefix=f"gateway-deploy-{deploy.id}-"))
        try:
            await asyncio.to_thread(
                self.repos.export_tree, deploy.app_name, deploy.new_sha, workdir, job.quarantine
            )
            return await pipelines.run_command(
                settings.command, workdir, self.command_env(deploy, workdir), job.log
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    def command_env(self, deploy: Deploy, workdir: Path) -> dict[str, str]:
        """The deploy command's whole environment: nothing from the pusher's session."""
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            "GATEWAY_APP": deploy.app_name,
            "GATEWAY_REF": deploy.ref,
            "GATEWAY_OLD_SHA": deploy.old_sha,
            "GATEWAY_NEW_SHA": deploy.new_sha,
            "GATEWAY_USER": deploy.pusher,
            "GATEWAY_KEY_FINGERPRINT": deploy.key_fingerprint,
            "GATEWAY_DEPLOY_ID": str(deploy.id),
            "GATEWAY_REPO": str(self.repos.path_for(deploy.app_name)),
        }

    async def _finish(
        self,
        job: Job,
        status: DeployStatus,
        *,
        exit_code: int | None = None,
        reason: str = "",
        superseded_by: int | None = None,
    ) -> Deploy:
        deploy = job.deploy
        await self.store.finish_deploy(
            deploy.id,
            status,
            utcnow(),
            exit_code=exit_code,
            reason=reason,
            superseded_by=superseded_by,
        )
        final = await self.store.get_deploy(deploy.id) or deploy
        elapsed = time.monotonic() - job.started if job.started is not None else None
        job.elapsed = elapsed
        if self.metrics is not None:
            if job.started is not None:
                self.metrics.deploys_running.dec()
            self.metrics.deploy_done(final.status.value, elapsed)
        job.log.close(f"----> deploy #{deploy.id} {self.describe(final, elapsed)}\n")
        self.jobs.pop(deploy.id, None)
        if not job.done.done():
            job.done.set_result(final)
        log.info(
            "event=deploy_finished deploy=%d app=%s status=%s exit_code=%s reason=%s duration=%s",
            deploy.id,
            deploy.app_name,
            final.status.value,
            exit_code,
            q(reason),
            f"{elapsed:.3f}" if elapsed is not None else "-",
        )
        return final

    # -- watching, cancelling, describing --

    async def watch(
        self, job: Job, say: Say, session: PushSession | None = None, until_done: bool = False
    ) -> Deploy | None:
        """Stream the job's log to `say` until it ends; return the final record, or None if
        the watcher went away first (unless `until_done`, for callers that need the result)."""
        watching = True
        with job.log.subscribe() as (so_far, queue):
            if so_far:
                watching = await _say_safely(say, so_far)
            while True:
                getter = asyncio.ensure_future(queue.get())
                waits: set[asyncio.Future[Any]] = {getter}
                if session is not None and not until_done:
                    waits.add(asyncio.ensure_future(session.detached.wait()))
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for other in pending:
                    other.cancel()
                if getter not in done:
                    getter.cancel()
                    return None
                text = getter.result()
                if text is None:
                    break
                if watching:
                    watching = await _say_safely(say, text)
                    if not watching and not until_done:
                        return None
        return await job.done

    async def follow(self, deploy_id: int, say: Say) -> Deploy:
        """Print a deploy's log; if it is still queued or running, stream it to the end."""
        job = self.jobs.get(deploy_id)
        if job is not None:
            final = await self.watch(job, say, until_done=True)
            if final is not None:
                await _say_safely(say, self.final_line(final, job.elapsed))
                return final
        deploy = await self.store.get_deploy(deploy_id)
        if deploy is None:
            raise NotFound(f"no deploy #{deploy_id}")
        await say(await asyncio.to_thread(read_log, self.log_dir, deploy_id))
        return deploy

    # -- webhook receivers' status reports --

    def status_base_url(self) -> str | None:
        if self.config.http.public_url:
            return self.config.http.public_url.rstrip("/")
        if self.http_address is None:
            return None
        host, port = self.http_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def wait_for_report(self, job: Job) -> pipelines.Outcome:
        job.report = asyncio.get_running_loop().create_future()
        try:
            return await job.report
        finally:
            job.report = None

    def report(
        self, deploy_id: int, text: str | None, status: DeployStatus | None, exit_code: int | None
    ) -> bool:
        """A receiver's report: log lines, and possibly the final status. False if the
        deploy is not waiting for one."""
        job = self.jobs.get(deploy_id)
        if job is None or job.report is None or job.report.done():
            return False
        if text:
            job.log.write(text if text.endswith("\n") else text + "\n")
        if status is not None:
            job.report.set_result(
                pipelines.Outcome(status, exit_code, f"reported {status.value} by the receiver")
            )
        return True

    async def log_text(self, deploy_id: int) -> str:
        """What is kept of a deploy's log so far (live if it is running)."""
        job = self.jobs.get(deploy_id)
        if job is not None:
            return job.log.text()
        return await asyncio.to_thread(read_log, self.log_dir, deploy_id)

    async def cancel(self, deploy_id: int, by: str) -> Deploy:
        job = self.jobs.get(deploy_id)
        if job is None:
            deploy = await self.store.get_deploy(deploy_id)
            if deploy is None:
                raise NotFound(f"no deploy #{deploy_id}")
            raise Conflict(f"deploy #{deploy_id} already ended: {deploy.status.value}")
        reason = f"cancelled by {by}"
        queue = self.queues.get(job.deploy.app_name)
        if queue is not None and job in queue.pending:
            queue.pending.remove(job)
            return await self._finish(job, DeployStatus.CANCELLED, reason=reason)
        job.stop = (DeployStatus.CANCELLED, reason)
        if job.task is not None:
            job.task.cancel()
        return await job.done

    def describe(self, deploy: Deploy, elapsed: float | None = None) -> str:
        status = deploy.status
        took = f" in {duration_text(elapsed)}" if elapsed is not None else ""
        if status is DeployStatus.SUCCEEDED:
            return f"succeeded{took}"
        if status is DeployStatus.FAILED:
            return f"FAILED ({deploy.reason or 'failed'}){took}"
        if status is DeployStatus.TIMED_OUT:
            return f"TIMED OUT ({deploy.reason}; killed)"
        return (
            f"{status.value.upper()} ({deploy.reason})" if deploy.reason else status.value.upper()
        )

    def final_line(self, deploy: Deploy, elapsed: float | None = None) -> str:
        text = f"deploy #{deploy.id} {self.describe(deploy, elapsed)}."
        if not deploy.status.ok:
            text += " The push itself is stored."
        return f"{text} Log: {self.logs_command(deploy.app_name, deploy.id)}\n"

    def logs_command(self, app: str, deploy_id: int, follow: bool = False) -> str:
        return self.config.ssh_command(f"logs {app} {deploy_id}" + (" --follow" if follow else ""))


async def _say_safely(say: Say, text: str) -> bool:
    try:
        await say(text)
        return True
    except Exception:  # the watcher's connection is gone; the deploy goes on
        return False


def _parse_update(raw: Any) -> RefUpdate:
    if not isinstance(raw, list) or len(raw) != 3 or not all(isinstance(p, str) for p in raw):
        raise ValueError("malformed ref update")
    old, new, ref = raw
    if not _SHA.fullmatch(old) or not _SHA.fullmatch(new) or not _REF.fullmatch(ref):
        raise ValueError("malformed ref update")
    return RefUpdate(old, new, ref)
