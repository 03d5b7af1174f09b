"""Deploy orchestration: what a push's hooks ask for, and the deploys that follow.

A push reaches this service through the repository hooks (see gateway/hooks.py), verified by
`pushes`: `post-receive` queues a deploy of the deploy branch and, in attached mode, streams
its log back; in gate mode `pre-receive` runs the deploy on the quarantined objects and its
result decides whether the refs move. Deploys run here, in the gateway, never in the hook
process: a pusher's Ctrl-C only stops the watching. Command pipelines run sandboxed
(`sandbox`, `command`); webhooks are delivered by `webhook`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from .. import audit, executors
from ..config import Config, DeploySettings
from ..deploylog import DeployLog, LogExists, read_log
from ..errors import Conflict, GatewayError, NotFound
from ..logs import q
from ..metrics import Metrics
from ..models import App, Deploy, DeployStatus, Identity, NewDeploy
from ..repos import Repositories
from ..store import Store, utcnow
from ..textsafe import TerminalStream
from . import messages, pushes
from .command import run_pipeline
from .outcome import Outcome
from .pushes import HookRefused, Peer, PushSession, RefUpdate, is_zero
from .queue import Job, Queues, Slots
from .sandbox import Sandbox, SandboxError
from .watch import Say, deliver, watch

log = logging.getLogger("gateway.deploys")


def pipeline_kind(settings: DeploySettings) -> str | None:
    if settings.command:
        return "command"
    if settings.webhook_url:
        return "webhook"
    return None


class DeployService:
    def __init__(self, config: Config, store: Store, repos: Repositories, git: str = "git") -> None:
        self.config = config
        self.store = store
        self.repos = repos
        self.git = git
        self.metrics: Metrics | None = None  # set by the server
        # Fixed for the process's life: the logs of earlier deploys are read from here.
        self.log_dir = config.deploy.log_dir
        self.pushes = pushes.PushSessions()
        self.jobs: dict[int, Job] = {}
        self.queues = Queues(Slots(config.deploy.max_parallel), self._run, self._superseded)
        self.closing = False
        # Set when the gateway drains: watchers that do not read are dropped quickly then.
        self.draining = asyncio.Event()
        self.http_address: tuple[str, int] | None = None  # set when the HTTP endpoint listens

    # -- lifecycle --

    async def start(self) -> None:
        """Recover from the previous run: running deploys were interrupted; queued ones run."""
        await executors.run(self.log_dir.mkdir, parents=True, exist_ok=True)
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
            await self._enqueue(deploy, settings, resume=True)

    async def close(self) -> None:
        """Stop running pipelines (recorded as interrupted); queued deploys wait for the next
        start, as recovery promises."""
        self.closing = self.queues.closing = True
        for job in list(self.jobs.values()):
            if job.task is not None and not job.task.done():
                job.stop = (DeployStatus.INTERRUPTED, "the gateway stopped")
                job.task.cancel()
        for worker in self.queues.workers():
            with contextlib.suppress(Exception):
                await worker
        for job in list(self.jobs.values()):
            job.log.close()

    async def reconfigure(self, config: Config) -> None:
        """A reload: new deploys follow the new settings; max_parallel applies at once."""
        self.config = config
        await self.queues.slots.resize(config.deploy.max_parallel)

    # -- push sessions, opened for receive-pack and presented by its hooks --

    async def open_session(
        self, identity: Identity, app: App, conn_id: str, peer: str = "-"
    ) -> PushSession:
        before = await executors.run(pushes.read_refs, self.repos.path_for(app.name))
        return self.pushes.open(identity, app, conn_id, peer, before)

    def close_session(self, session: PushSession) -> None:
        self.pushes.close(session)

    # -- hooks --

    async def handle_hook(self, request: dict[str, Any], say: Say, peer: Peer | None) -> int:
        """Answer one hook request; everything said reaches the pusher's terminal escaped
        (deploy output may keep plain SGR colours)."""
        stream = TerminalStream(allow_sgr=True)

        async def say_safely(text: str) -> None:
            safe = stream.feed(text)
            if safe:
                await say(safe)

        try:
            return await self._hook(request, say_safely, peer)
        finally:
            rest = stream.flush()
            if rest:
                with contextlib.suppress(Exception):
                    await say(rest)

    async def _hook(self, request: dict[str, Any], say: Say, peer: Peer | None) -> int:
        hook = request.get("hook")
        gate = hook == "pre-receive"
        try:
            session = self.pushes.claim(request.get("token"), hook, peer)
        except HookRefused as exc:
            log.warning(
                "event=hook_refused hook=%s reason=%s peer_pid=%s peer_uid=%s",
                q(str(hook)[:40]),
                exc,
                peer.pid if peer else "-",
                peer.uid if peer else "-",
            )
            await say("gateway: this push is not known to the gateway\n")
            return 1 if gate else 0
        app = session.app
        path = self.repos.path_for(app.name)
        try:
            updates = pushes.parse_updates(request.get("updates"))
            if gate:
                await executors.run(pushes.verify_before, path, updates)
            else:
                await executors.run(pushes.verify_after, path, updates, session.refs_before)
        except HookRefused as exc:
            log.warning(
                "event=hook_refused hook=%s app=%s conn=%s reason=%s",
                hook,
                app.name,
                session.conn_id,
                q(str(exc)),
            )
            await say("gateway: the ref updates do not match the repository: nothing deployed\n")
            return 1 if gate else 0
        if gate:
            return await self._pre_receive(session, updates, request.get("quarantine"), say)
        # post-receive lists exactly the refs this push changed, checked against the
        # repository: the audit trail's push record.
        await audit.record(
            self.store,
            "push",
            actor=session.identity.user_name,
            fingerprint=session.identity.fingerprint,
            source=session.peer,
            app=app.name,
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
            if not isinstance(quarantine, str) or not quarantine:
                raise GatewayError("no quarantine")
            path = await executors.run(self.repos.quarantine_path, app.name, quarantine)
        except GatewayError as exc:
            log.warning("event=hook_refused app=%s reason=%s", app.name, q(exc))
            await say("gateway: cannot read the pushed objects; push refused\n")
            return 1
        job = await self.submit(session, update, settings, quarantine=path, expected_old=update.old)
        await say(
            f"deploy #{job.deploy.id} of {app.name} ({app.deploy_branch} "
            f"{messages.short(update.new)}): gate mode, the branch moves only if this deploy "
            "succeeds\n"
        )
        final = await watch(job, say, self.draining, session, until_done=True)
        if final is None:  # pragma: no cover - until_done waits for the end
            return 1
        if final.status.ok:
            await say(
                f"deploy #{final.id} {messages.describe(final, job.elapsed)}: "
                f"updating {app.deploy_branch}\n"
            )
            return 0
        await say(
            f"deploy #{final.id} {messages.describe(final)}: push rejected, "
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
                    f"deploy #{job.deploy.id} of {app.name} queued "
                    f"({messages.short(update.new)}); the push is done. Follow it: {follow}\n"
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
        running = self.queues.running(app.name)
        if running is not None and running is not job:
            state = f"queued behind #{running.deploy.id}"
        elif self.queues.slots.full:
            state = f"queued: all {self.queues.slots.limit} deploy slots are busy"
        else:
            state = "started"
        lines = [
            f"deploy #{deploy.id} of {app.name} {state}. Ctrl-C stops watching, not the deploy.",
            f"Watch it again with: {self.logs_command(app.name, deploy.id, True)}",
        ]
        await say("".join(f"{line}\n" for line in lines))
        final = await watch(job, say, self.draining, session)
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
        info = await executors.run(self.repos.commit_info, app.name, update.new, quarantine)
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
            messages.short(update.new),
            deploy.pusher,
            deploy.mode,
        )
        return await self._enqueue(deploy, settings, quarantine, expected_old)

    async def _enqueue(
        self,
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
                deploy.app_name,
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
        if refused is not None:
            await self._finish(job, DeployStatus.FAILED, reason=str(refused))
            return job
        self.jobs[deploy.id] = job
        await self.queues.add(job)
        return job

    async def _superseded(self, older: Job, newer: Job) -> None:
        await self._finish(
            older,
            DeployStatus.CANCELLED,
            reason=f"superseded by #{newer.deploy.id}",
            superseded_by=newer.deploy.id,
        )

    async def _run(self, job: Job) -> None:
        try:
            await self._run_job(job)
        except Exception:
            log.exception("event=deploy_crashed deploy=%d", job.deploy.id)
            await self._finish(job, DeployStatus.FAILED, reason="internal error")

    async def _run_job(self, job: Job) -> None:
        deploy = job.deploy
        if not await self.store.start_deploy(deploy.id, utcnow()):
            return
        job.started = time.monotonic()
        if self.metrics is not None:
            self.metrics.deploys_running.inc()
        log.info("event=deploy_started deploy=%d app=%s", deploy.id, deploy.app_name)
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
        if self.closing:
            await self._finish(job, DeployStatus.INTERRUPTED, reason="the gateway stopped")
            return
        job.task = asyncio.create_task(self._pipeline(job))
        if job.stop is not None:  # cancelled while it was starting
            job.task.cancel()
        done, _ = await asyncio.wait({job.task}, timeout=job.settings.timeout)
        if job.task not in done:
            job.stop = (
                DeployStatus.TIMED_OUT,
                f"timed out after {messages.duration_text(job.settings.timeout)}",
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

    async def _pipeline(self, job: Job) -> Outcome:
        deploy, settings = job.deploy, job.settings
        if pipeline_kind(settings) == "webhook":
            from .webhook import deliver  # only loaded where webhooks are used

            return await deliver(self, job)
        try:
            sandbox = Sandbox.of(settings)
        except SandboxError as exc:
            log.error("event=deploy_sandbox_unavailable deploy=%d reason=%s", deploy.id, q(exc))
            job.log.write("the deploy sandbox is not available: see the gateway's log\n")
            return Outcome(DeployStatus.FAILED, None, "deploy sandbox unavailable")
        return await run_pipeline(
            settings.command,
            deploy,
            git=self.git,
            repo=self.repos.path_for(deploy.app_name),
            quarantine=job.quarantine,
            sandbox=sandbox,
            build_dir=self.config.deploy.build_dir,
            max_export_size=settings.max_export_size,
            max_output=settings.max_output,
            log=job.log,
        )

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
        job.log.close(f"----> deploy #{deploy.id} {messages.describe(final, elapsed)}\n")
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

    async def follow(self, deploy_id: int, say: Say) -> Deploy:
        """Print a deploy's log; if it is still queued or running, stream it to the end."""
        job = self.jobs.get(deploy_id)
        if job is not None:
            final = await watch(job, say, self.draining, until_done=True)
            if final is not None:
                await deliver(say, self.final_line(final, job.elapsed), self.draining)
                return final
        deploy = await self.store.get_deploy(deploy_id)
        if deploy is None:
            raise NotFound(f"no deploy #{deploy_id}")
        await say(await executors.run(read_log, self.log_dir, deploy_id))
        return deploy

    # -- webhook receivers' status reports --

    def status_base_url(self) -> str | None:
        if self.config.http.public_url:
            return self.config.http.public_url.rstrip("/")
        if self.http_address is None:
            return None
        host, port = self.http_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def wait_for_report(self, job: Job) -> Outcome:
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
                Outcome(status, exit_code, f"reported {status.value} by the receiver")
            )
        return True

    async def log_text(self, deploy_id: int) -> str:
        """What is kept of a deploy's log so far (live if it is running)."""
        job = self.jobs.get(deploy_id)
        if job is not None:
            return job.log.text()
        return await executors.run(read_log, self.log_dir, deploy_id)

    async def cancel(self, deploy_id: int, by: str) -> Deploy:
        job = self.jobs.get(deploy_id)
        if job is None:
            deploy = await self.store.get_deploy(deploy_id)
            if deploy is None:
                raise NotFound(f"no deploy #{deploy_id}")
            raise Conflict(f"deploy #{deploy_id} already ended: {deploy.status.value}")
        reason = f"cancelled by {by}"
        if self.queues.withdraw(job):
            return await self._finish(job, DeployStatus.CANCELLED, reason=reason)
        job.stop = (DeployStatus.CANCELLED, reason)
        if job.task is not None:
            job.task.cancel()
        return await job.done

    async def cancel_app(self, app: str, by: str) -> int:
        """Cancel every queued and running deploy of an app (it is being removed)."""
        jobs = [job for job in list(self.jobs.values()) if job.deploy.app_name == app]
        jobs.sort(key=lambda job: job.started is not None)  # waiting ones first: none starts
        for job in jobs:
            with contextlib.suppress(GatewayError):
                await self.cancel(job.deploy.id, by)
        return len(jobs)

    def describe(self, deploy: Deploy, elapsed: float | None = None) -> str:
        return messages.describe(deploy, elapsed)

    def final_line(self, deploy: Deploy, elapsed: float | None = None) -> str:
        return messages.final_line(self.config, deploy, elapsed)

    def logs_command(self, app: str, deploy_id: int, follow: bool = False) -> str:
        return messages.logs_command(self.config, app, deploy_id, follow)
