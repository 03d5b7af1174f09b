"""Deploy orchestration: what a push's hooks ask for, and the deploys that follow.

A push reaches this service through the repository hooks (see gateway/git/hooks.py), verified by
`pushes`: `post-receive` queues a deploy of the deploy branch and, in attached mode, streams
its log back; in gate mode `pre-receive` queues a deploy of the quarantined objects and its
result decides whether the refs move. The queue lives in the registry, shared by every gateway
process on every node: each claims what it may run (one deploy per app across all of them,
`max_parallel` per node name), renews a lease while it lives, and declares gone the processes
whose lease lapsed (their running deploys become interrupted). A deploy's log is stored in the
registry too, so a watcher follows it through any gateway. Deploys run in the gateway, never
in the hook process: a pusher's Ctrl-C only stops the watching. Command pipelines run
sandboxed (`sandbox`, `command`); webhooks are delivered by `webhook`.
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
from pathlib import Path
from typing import Any

from .. import executors
from ..config import Config, DeploySettings, size_text
from ..domain import audit
from ..domain.deploylog import DeployLog, legacy_log_ids, read_legacy_log, read_log
from ..errors import Conflict, GatewayError, NotFound, StoreUnavailable
from ..git.repos import Repositories
from ..logs import q
from ..metrics import Metrics
from ..models import App, Deploy, DeployStatus, Identity, NewDeploy
from ..store import Store, utcnow
from ..textsafe import TerminalStream
from . import messages, pushes
from . import options as push_options
from .command import run_pipeline
from .fanout import LogReaders
from .options import OptionError, PushOptions
from .outcome import Outcome
from .pushes import HookRefused, Peer, PushSession, RefUpdate, is_zero
from .queue import QUEUE, Job, Wakeups
from .sandbox import Sandbox, SandboxError
from .watch import Say, deliver

log = logging.getLogger("gateway.deploys")

# How often a process looks at the registry for news nobody announced to it: other processes'
# changes on SQLite (several workers or nodes on one file), or while PostgreSQL's notifications
# are not heard; when they are, only as a safety net.
POLL_INTERVAL = 0.5
POLL_INTERVAL_HEARING = 5.0
FINISH_RETRY = 1.0  # seconds between attempts to record a deploy's end while the registry is away
# A receiver's report text for a deploy that runs in another process: at most this many
# characters (the tail) per report, this many reports per second and deploy.
REPORT_TEXT = 16 * 1024
REPORTS_PER_SECOND = 5.0


class Pace:
    """At most `rate` events per second per key, bursts of that size (a token bucket)."""

    def __init__(self, rate: float, keys: int = 1000) -> None:
        self.rate = rate
        self.keys = keys
        self._buckets: dict[int, tuple[float, float]] = {}

    def allow(self, key: int) -> bool:
        now = time.monotonic()
        tokens, then = self._buckets.get(key, (self.rate, now))
        tokens = min(self.rate, tokens + (now - then) * self.rate)
        if tokens < 1:
            return False
        if len(self._buckets) >= self.keys and key not in self._buckets:
            self._buckets.clear()  # bounded: forgetting old deploys' buckets is harmless
        self._buckets[key] = (tokens - 1, now)
        return True


def pipeline_kind(settings: DeploySettings) -> str | None:
    if settings.command:
        return "command"
    if settings.webhook_url:
        return "webhook"
    return None


def node_id(node_name: str = "") -> str:
    """This process's name in the registry's nodes table, unique per start; deploys record
    it as their runner, so it starts with the machine's name as configured ([cluster]
    node_name), else its host name."""
    name = (node_name or socket.gethostname().split(".")[0])[:63] or "gateway"
    return f"{name}-{os.getpid()}-{secrets.token_hex(4)}"


class DeployService:
    def __init__(self, config: Config, store: Store, repos: Repositories, git: str = "git") -> None:
        self.config = config
        self.store = store
        self.repos = repos
        self.git = git
        self.metrics: Metrics | None = None  # set by the server
        self.node = node_id(config.cluster.node_name)
        self.node_name = config.cluster.node_name or socket.gethostname()
        self.pushes = pushes.PushSessions()
        self.jobs: dict[int, Job] = {}  # the deploys this process runs
        # Gated pushes waiting in this process: their quarantine lives with the push.
        self.gated: dict[int, tuple[Path, str]] = {}
        self.wakeups = Wakeups()
        # Watchers of one deploy share one reader of its log (issue 20: one per watcher,
        # reading on every flush, slowed every tenant).
        self.readers = LogReaders(
            store, self.wakeups, self.poll_interval, lambda: self.config.deploy.log_limit
        )
        self.closing = False
        # Set when the gateway drains: watchers that do not read are dropped quickly then.
        self.draining = asyncio.Event()
        self.http_address: tuple[str, int] | None = None  # set when the HTTP endpoint listens
        self._loops: list[asyncio.Task[None]] = []
        self._healthy_since = time.monotonic()
        self._renewed = time.monotonic()  # the last successful lease renewal
        self.fenced = False  # no renewal for half the timeout: running and claiming nothing
        # Deploys whose pusher waits on this process (attached, gated): a draining gateway
        # still runs those, so that it does not hold its drain for nothing.
        self.watched_here: set[int] = set()
        # Report text for a deploy running elsewhere is written here: paced per deploy.
        self._report_pace = Pace(REPORTS_PER_SECOND)

    # -- lifecycle --

    async def start(self) -> None:
        """Join the processes sharing the queue: register, take in the log files of earlier
        versions, interrupt the deploys nobody runs any more, then claim and renew."""
        self.store.subscribe(self._heard)
        await self.store.register_node(self.node, self.node_name, os.getpid())
        self._healthy_since = self._renewed = time.monotonic()
        await self._import_legacy_logs()
        # Running deploys with no registered runner at all (a version before the shared
        # queue, or a process that left without ending them) can be ended at once.
        for deploy in await self.store.expire_nodes(10.0**9):
            self._interrupted(deploy)
        await self.store.start_listening()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="deploy-claims"),
            asyncio.create_task(self._lease_loop(), name="deploy-lease"),
        ]
        log.info(
            "event=deploy_node_started node=%s name=%s node_timeout=%s",
            self.node,
            q(self.node_name),
            self.config.cluster.node_timeout,
        )

    async def close(self) -> None:
        """Stop running pipelines (recorded as interrupted) and leave; queued deploys wait
        in the registry for whichever process claims them next."""
        self.closing = True
        for loop_task in self._loops:
            loop_task.cancel()
        for job in list(self.jobs.values()):
            self._stop(job, DeployStatus.INTERRUPTED, "the gateway stopped")
        for job in list(self.jobs.values()):
            if job.task is not None:
                with contextlib.suppress(BaseException):
                    await job.task
        for loop_task in self._loops:
            with contextlib.suppress(BaseException):
                await loop_task
        await self.readers.close()
        with contextlib.suppress(GatewayError):
            await self.store.leave_node(self.node)

    async def reconfigure(self, config: Config) -> None:
        """A reload: new deploys follow the new settings; max_parallel applies at once."""
        self.config = config
        self.wakeups.fire(QUEUE)

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

    async def _import_legacy_logs(self) -> None:
        """Earlier versions wrote each log to `<log_dir>/<id>.log`: the log of a deploy still
        recorded goes into the registry (once); every such file is then set aside, so that
        none is ever read again, whatever its id."""
        log_dir = self.config.deploy.log_dir
        ids = await executors.run(legacy_log_ids, log_dir)
        if not ids:
            return
        await self.store.reserve_deploy_ids(ids[-1])
        target = log_dir / f"imported-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        await executors.run(target.mkdir, 0o700)
        imported = moved = 0
        for deploy_id in ids:
            name = f"{deploy_id}.log"
            try:
                # Taken first, by rename: of processes starting together, one imports it.
                await executors.run(os.rename, log_dir / name, target / name)
            except FileNotFoundError:
                continue
            moved += 1
            if await self.store.get_deploy(deploy_id) and not await self.store.deploy_log(
                deploy_id, 0, 1
            ):
                text = await executors.run(
                    read_legacy_log, target, deploy_id, self.config.deploy.log_limit
                )
                if text:
                    await self.store.append_deploy_log(
                        deploy_id, text, keep=self.config.deploy.log_limit
                    )
                    imported += 1
        log.info(
            "event=deploy_logs_imported imported=%d files=%d moved_to=%s",
            imported,
            moved,
            target,
        )

    # -- the lease --

    async def _lease_loop(self) -> None:
        """Renew this process's lease; declare gone the processes whose lease lapsed, but only
        after this one has itself renewed without fail for a whole timeout (after an outage
        of the registry, every process gets its chance to renew first).

        A process that cannot renew for half the timeout fences itself: it stops what it
        runs (recorded as interrupted once the registry answers) and claims nothing, so that
        no deploy runs here while the others, who can no longer see this process, start the
        app's next one."""
        while True:
            timeout = self.config.cluster.node_timeout
            await asyncio.sleep(timeout / 5)
            try:
                renewed = await self._renew(timeout)
                self._renewed = time.monotonic()
                if self.fenced:
                    self.fenced = False
                    log.warning("event=deploy_node_unfenced node=%s", self.node)
                    self.wakeups.fire(QUEUE)
                if not renewed:
                    await self._lease_lost()
                if time.monotonic() - self._healthy_since >= timeout:
                    for deploy in await self.store.expire_nodes(timeout):
                        self._interrupted(deploy)
                await self._check_cancels()
            except StoreUnavailable:
                self._healthy_since = time.monotonic()
            except Exception:
                self._healthy_since = time.monotonic()
                log.exception("event=deploy_lease_error")
            if not self.fenced and time.monotonic() - self._renewed > timeout / 2:
                self._fence()

    async def _renew(self, lapse: float) -> bool:
        """Renew the lease; while a renewal hangs (a registry locked or unreachable), see
        every fifth of the timeout whether this process must fence itself meanwhile."""
        renewal = asyncio.ensure_future(self.store.renew_node(self.node))
        while True:
            done, _ = await asyncio.wait({renewal}, timeout=lapse / 5)
            if done:
                return renewal.result()
            self._healthy_since = time.monotonic()
            if not self.fenced and time.monotonic() - self._renewed > lapse / 2:
                self._fence()

    def _fence(self) -> None:
        self.fenced = True
        log.error(
            "event=deploy_node_fenced node=%s running=%d reason=no_lease_renewal",
            self.node,
            len(self.jobs),
        )
        for job in list(self.jobs.values()):
            self._stop(job, DeployStatus.INTERRUPTED, "this gateway lost touch with the registry")

    async def _lease_lost(self) -> None:
        """The others declared this process gone (it was cut off longer than the timeout):
        what it ran is recorded as interrupted already, so it stops it and joins again."""
        log.error("event=deploy_lease_lost node=%s running=%d", self.node, len(self.jobs))
        for job in list(self.jobs.values()):
            self._stop(job, DeployStatus.INTERRUPTED, "this gateway lost touch with the others")
        await self.store.register_node(self.node, self.node_name, os.getpid())
        self._healthy_since = time.monotonic()

    async def _check_cancels(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            for deploy_id, reason in await self.store.cancel_requests(self.node):
                job = self.jobs.get(deploy_id)
                if job is not None:
                    self._stop(job, DeployStatus.CANCELLED, reason)

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
                        self.node, self.node_name, self.config.deploy.max_parallel, only=only
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
        settings = self.config.deploy_for(deploy.app_name)
        gated = self.gated.pop(deploy.id, None)
        job = Job(
            deploy,
            settings,
            DeployLog(self.store, deploy.id, self.config.deploy.log_limit),
            asyncio.get_running_loop().create_future(),
            gated[0] if gated else None,
            gated[1] if gated else None,
        )
        job.started = time.monotonic()
        self.jobs[deploy.id] = job
        job.task = asyncio.create_task(self._run(job), name=f"deploy-{deploy.id}")

    def _stop(self, job: Job, status: DeployStatus, reason: str) -> None:
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
        if pipeline_kind(job.settings) is None:
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
        job.pipeline = asyncio.create_task(self._pipeline(job))
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

    async def _pipeline(self, job: Job) -> Outcome:
        deploy, settings = job.deploy, job.settings
        if pipeline_kind(settings) == "webhook":
            from .webhook import deliver as deliver_webhook  # only loaded where webhooks are used

            return await deliver_webhook(self, job)
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
            setting=self._command_setting(deploy.app_name),
        )

    def _command_setting(self, app: str) -> str:
        """Where the app's deploy command is configured, as the operator would look for it."""
        overridden = "command" in (self.config.apps.get(app) or {})
        return f"[apps.{app}] command" if overridden else "[deploy] command"

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
        try:
            session.options = self._options(session, updates, request.get("options"))
        except OptionError as exc:
            log.warning(
                "event=push_refused app=%s conn=%s user=%s reason=push_option detail=%s",
                app.name,
                session.conn_id,
                session.identity.user_name,
                q(str(exc)),
            )
            await say(f"push refused: {exc}\n")
            return 1 if gate else 0
        if gate:
            refusal = await self._oversized(session, request.get("quarantine"))
            if refusal:
                await say(f"push refused: {refusal}\n")
                return 1
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
            **({"options": session.options.words()} if session.options.given else {}),
        )
        return await self._post_receive(session, updates, say)

    async def _oversized(self, session: PushSession, quarantine: Any) -> str:
        """Why this push is refused for a commit or tag over [limits] max_commit_size, or "":
        pre-receive, before any ref moves and before anything reads the new objects (a
        repeated message compresses 1000:1, so the pack's own limit does not bound them)."""
        if not isinstance(quarantine, str) or not quarantine:
            return ""  # nothing new came in (deletions, or refs to objects already here)
        app = session.app
        try:
            path = await executors.run(self.repos.quarantine_path, app.name, quarantine)
            found = await executors.run(self.repos.oversized_object, app.name, path)
        except GatewayError as exc:
            log.warning("event=hook_refused app=%s reason=%s", app.name, q(exc))
            return "the gateway cannot read the pushed objects"
        if found is None:
            return ""
        sha, kind, size = found
        limit = self.repos.max_commit_size
        log.warning(
            "event=push_refused app=%s conn=%s user=%s reason=object_too_large object=%s "
            "type=%s size=%d limit=%d",
            app.name,
            session.conn_id,
            session.identity.user_name,
            sha,
            kind,
            size,
            limit,
        )
        return (
            f"{kind} {messages.short(sha)} is {size_text(size)} (message and headers), over "
            f"this gateway's limit of {size_text(limit)} per {kind} ([limits] max_commit_size)"
        )

    def _options(self, session: PushSession, updates: list[RefUpdate], raw: Any) -> PushOptions:
        """This push's options: parsed and checked in pre-receive, before any ref moves (the
        post-receive of the same push keeps what pre-receive accepted)."""
        if session.options is not None:
            return session.options
        found = push_options.parse(raw)
        app = session.app
        settings = self.config.deploy_for(app.name)
        moves = any(u.ref == self._deploy_ref(app) and not is_zero(u.new) for u in updates)
        if moves and settings.mode == "gate" and pipeline_kind(settings) is not None:
            # Gate mode is the operator's rule that the branch moves only after a
            # successful deploy: a pusher cannot opt out of it.
            opted_out = ((push_options.SKIP, found.skip), (push_options.DETACH, found.detach))
            for name, given in opted_out:
                if given:
                    raise OptionError(
                        f"{name} is not available for {app.name}: it deploys in gate mode, "
                        f"{app.deploy_branch} moves only after a successful deploy"
                    )
        return found

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
        deploy = await self.submit(
            session, update, settings, quarantine=path, expected_old=update.old
        )
        await say(
            f"deploy #{deploy.id} of {app.name} ({app.deploy_branch} "
            f"{messages.short(update.new)}): gate mode, the branch moves only if this deploy "
            "succeeds\n"
        )
        self.watched_here.add(deploy.id)
        try:
            final = await self._watch(deploy.id, say, session, until_done=True)
        finally:
            self.gated.pop(deploy.id, None)
            self.watched_here.discard(deploy.id)
        if final is None:  # pragma: no cover - until_done waits for the end
            return 1
        if final.status.ok:
            await say(
                f"deploy #{final.id} {messages.describe(final, final.elapsed)}: "
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
        wanted = session.options or push_options.NONE
        settings = dataclasses.replace(settings, mode=wanted.mode(settings.mode))
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
            elif wanted.skip:
                await say(
                    f"{app.deploy_branch} is now {messages.short(update.new)}, not deployed "
                    f"({push_options.SKIP}); the next push without it deploys\n"
                )
            elif settings.mode == "gate":
                continue  # deployed before the refs moved, in pre-receive
            elif settings.mode == "detached":
                deploy = await self.submit(session, update, settings)
                follow = self.logs_command(app.name, deploy.id, True)
                await say(
                    f"deploy #{deploy.id} of {app.name} queued "
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
        deploy = await self.submit(session, update, settings)
        lines = [
            f"deploy #{deploy.id} of {app.name} {await self._state(deploy)}. "
            "Ctrl-C stops watching, not the deploy.",
            f"Watch it again with: {self.logs_command(app.name, deploy.id, True)}",
        ]
        await say("".join(f"{line}\n" for line in lines))
        self.watched_here.add(deploy.id)
        try:
            final = await self._watch(deploy.id, say, session)
        finally:
            self.watched_here.discard(deploy.id)
        if final is None:
            return  # the pusher left; the deploy goes on
        if not final.status.ok:
            session.failed = True
        await say(self.final_line(final, final.elapsed))

    async def _state(self, deploy: Deploy) -> str:
        """Where a new deploy stands, for the pusher's first line."""
        for other in await self.store.list_deploys(deploy.app_name, limit=5):
            if other.id != deploy.id and other.status is DeployStatus.RUNNING:
                return f"queued behind #{other.id}"
        # The claim is a moment away: give it that moment before saying where it is.
        for _ in range(2):
            current = await self.store.get_deploy(deploy.id)
            if current is None or current.status is not DeployStatus.QUEUED:
                return "started"
            await self.wakeups.wait(deploy.id, 0.2)
        return "queued: every deploy slot is busy"

    # -- queueing --

    async def submit(
        self,
        session: PushSession,
        update: RefUpdate,
        settings: DeploySettings,
        quarantine: Path | None = None,
        expected_old: str | None = None,
    ) -> Deploy:
        """Queue a deploy of this push; a gated one waits for this process to claim it."""
        app = session.app
        info = await executors.run(self.repos.commit_info, app.name, update.new, quarantine)
        queued = await self.store.queue_deploy(
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
                note=session.options.note if session.options else None,
            ),
            origin=self.node if quarantine is not None else None,
        )
        deploy = queued.deploy
        if quarantine is not None and expected_old is not None:
            self.gated[deploy.id] = (quarantine, expected_old)
            self.wakeups.fire(QUEUE)
        for older in queued.superseded:
            self.gated.pop(older, None)
            log.info("event=deploy_superseded deploy=%d by=%d app=%s", older, deploy.id, app.name)
        log.info(
            "event=deploy_queued deploy=%d app=%s sha=%s pusher=%s mode=%s",
            deploy.id,
            app.name,
            messages.short(update.new),
            deploy.pusher,
            deploy.mode,
        )
        return deploy

    # -- watching, cancelling, describing --

    async def _watch(
        self,
        deploy_id: int,
        say: Say,
        session: PushSession | None = None,
        until_done: bool = False,
    ) -> Deploy | None:
        return await self.readers.watch(
            deploy_id, say, self.draining, session=session, until_done=until_done
        )

    async def follow(self, deploy_id: int, say: Say) -> Deploy:
        """Print a deploy's log; if it is still queued or running, stream it to the end,
        wherever it runs."""
        final = await self._watch(deploy_id, say, until_done=True)
        if final is None:  # pragma: no cover - until_done waits for the end
            raise NotFound(f"no deploy #{deploy_id}")
        await deliver(say, self.final_line(final, final.elapsed), self.draining)
        return final

    async def wait_done(self, deploy_id: int) -> Deploy:
        """The deploy's final record, once it has one."""
        while True:
            deploy = await self.store.get_deploy(deploy_id)
            if deploy is None:
                raise NotFound(f"no deploy #{deploy_id}")
            if deploy.status.finished:
                return deploy
            await self.wakeups.wait(deploy_id, self.poll_interval())

    # -- webhook receivers' status reports --

    def status_base_url(self) -> str | None:
        if self.config.http.public_url:
            return self.config.http.public_url.rstrip("/")
        if self.http_address is None:
            return None
        host, port = self.http_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def wait_for_report(self, job: Job) -> Outcome:
        """A receiver's report reaches whichever gateway it calls: it is read back from the
        registry."""
        deploy_id = job.deploy.id
        while True:
            found = await self.store.deploy_report(deploy_id)
            if found is not None:
                status, exit_code = found
                return Outcome(status, exit_code, f"reported {status.value} by the receiver")
            await self.wakeups.wait(deploy_id, self.poll_interval())

    async def report(
        self, deploy_id: int, text: str | None, status: DeployStatus | None, exit_code: int | None
    ) -> str:
        """A receiver's report: log lines, and possibly the final status. "ok", "not
        waiting" (the deploy waits for no report) or "slow down" (paced)."""
        deploy = await self.store.get_deploy(deploy_id)
        if deploy is None or deploy.status is not DeployStatus.RUNNING:
            return "not waiting"
        if await self.store.deploy_report(deploy_id) is not None:
            return "not waiting"
        if text:
            text = text if text.endswith("\n") else text + "\n"
            job = self.jobs.get(deploy_id)
            if job is not None:
                job.log.write(text)  # bounded and paced like the deploy's own output
            elif not self._report_pace.allow(deploy_id):
                return "slow down"
            else:
                await self.store.append_deploy_log(
                    deploy_id, text[-REPORT_TEXT:], keep=self.config.deploy.log_limit
                )
        if status is not None and not await self.store.report_deploy(deploy_id, status, exit_code):
            return "not waiting"
        return "ok"

    async def log_text(self, deploy_id: int) -> str:
        """What is kept of a deploy's log so far (live if it is running)."""
        return await read_log(self.store, deploy_id)

    async def cancel(self, deploy_id: int, by: str) -> Deploy:
        """Stop a deploy wherever it runs; its final record once it has ended."""
        before = await self.store.get_deploy(deploy_id)
        if before is None:
            raise NotFound(f"no deploy #{deploy_id}")
        if before.status.finished:
            raise Conflict(f"deploy #{deploy_id} already ended: {before.status.value}")
        await self.store.request_cancel(deploy_id, f"cancelled by {by}")
        job = self.jobs.get(deploy_id)
        if job is not None:
            self._stop(job, DeployStatus.CANCELLED, f"cancelled by {by}")
        self.gated.pop(deploy_id, None)
        return await self.wait_done(deploy_id)

    async def cancel_app(self, app: str, by: str) -> int:
        """Cancel every queued and running deploy of an app (it is being removed): the
        waiting ones first, so that none of them starts."""
        try:
            records = await self.store.list_deploys(app, limit=1000)
        except NotFound:
            return 0
        open_ones = [d for d in records if not d.status.finished]
        open_ones.sort(key=lambda d: d.status is DeployStatus.RUNNING)
        for deploy in open_ones:
            with contextlib.suppress(GatewayError):
                await self.cancel(deploy.id, by)
        return len(open_ones)

    def describe(self, deploy: Deploy, elapsed: float | None = None) -> str:
        return messages.describe(deploy, elapsed)

    def final_line(self, deploy: Deploy, elapsed: float | None = None) -> str:
        return messages.final_line(self.config, deploy, elapsed)

    def logs_command(self, app: str, deploy_id: int, follow: bool = False) -> str:
        return messages.logs_command(self.config, app, deploy_id, follow)
