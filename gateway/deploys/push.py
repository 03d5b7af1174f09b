"""A push's hooks, answered: the requests of pre-receive and post-receive, verified, then
deployed as the app's mode says.

A push reaches this module through the repository hooks (see gateway/git/hooks.py), verified
by `pushes`: `post-receive` queues a deploy of the deploy branch and, in attached mode,
streams its log back; in detached mode it only queues it; in gate mode `pre-receive` queues a
deploy of the quarantined objects and its result decides whether the refs move.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import executors
from ..config import Config, DeploySettings, size_text
from ..domain import audit
from ..errors import GatewayError
from ..git.repos import Repositories
from ..logs import q
from ..models import App, Deploy, DeployStatus, Identity, NewDeploy
from ..store import Store
from ..textsafe import TerminalStream
from . import messages, pipelines, pushes
from . import options as push_options
from .fanout import LogReaders
from .options import OptionError, PushOptions
from .pushes import HookRefused, Peer, PushSession, RefUpdate, is_zero
from .runner import Runner
from .watch import Say

log = logging.getLogger("gateway.deploys")


class PushHandler:
    """The hooks' requests of every push this process serves, and the deploys they queue."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        repos: Repositories,
        runner: Runner,
        readers: LogReaders,
        draining: asyncio.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.repos = repos
        self.runner = runner
        self.readers = readers
        self.draining = draining
        self.sessions = pushes.PushSessions()

    # -- push sessions, opened for receive-pack and presented by its hooks --

    async def open_session(
        self, identity: Identity, app: App, conn_id: str, peer: str = "-"
    ) -> PushSession:
        before = await executors.run(pushes.read_refs, self.repos.path_for(app.name))
        return self.sessions.open(identity, app, conn_id, peer, before)

    def close_session(self, session: PushSession) -> None:
        self.sessions.close(session)

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
            session = self.sessions.claim(request.get("token"), hook, peer)
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
            more={"options": session.options.words()} if session.options.given else None,
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
        settings = self.config().deploy_for(app.name)
        moves = any(u.ref == self._deploy_ref(app) and not is_zero(u.new) for u in updates)
        if moves and settings.mode == "gate" and pipelines.kind_of(settings) is not None:
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

    def _logs(self, app: str, deploy_id: int, follow: bool = False) -> str:
        return messages.logs_command(self.config(), app, deploy_id, follow)

    def _deploy_ref(self, app: App) -> str:
        return f"refs/heads/{app.deploy_branch}"

    async def _pre_receive(
        self, session: PushSession, updates: list[RefUpdate], quarantine: Any, say: Say
    ) -> int:
        app = session.app
        settings = self.config().deploy_for(app.name)
        if settings.mode != "gate" or pipelines.kind_of(settings) is None:
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
        self.runner.watched_here.add(deploy.id)
        try:
            final = await self.readers.watch(
                deploy.id, say, self.draining, session=session, until_done=True
            )
        finally:
            self.runner.gated.pop(deploy.id, None)
            self.runner.watched_here.discard(deploy.id)
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
            f"{app.deploy_branch} unchanged. Log: {self._logs(app.name, final.id)}\n"
        )
        return 1

    async def _post_receive(self, session: PushSession, updates: list[RefUpdate], say: Say) -> int:
        app = session.app
        settings = self.config().deploy_for(app.name)
        wanted = session.options or push_options.NONE
        settings = dataclasses.replace(settings, mode=wanted.mode(settings.mode))
        kind = pipelines.kind_of(settings)
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
                follow = self._logs(app.name, deploy.id, True)
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
            f"Watch it again with: {self._logs(app.name, deploy.id, True)}",
        ]
        await say("".join(f"{line}\n" for line in lines))
        self.runner.watched_here.add(deploy.id)
        try:
            final = await self.readers.watch(deploy.id, say, self.draining, session=session)
        finally:
            self.runner.watched_here.discard(deploy.id)
        if final is None:
            return  # the pusher left; the deploy goes on
        if not final.status.ok:
            session.failed = True
        await say(messages.final_line(self.config(), final, final.elapsed))

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
            await self.runner.wakeups.wait(deploy.id, 0.2)
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
        pipeline = pipelines.chosen(settings)
        if pipeline is None:  # pragma: no cover - the hooks queue nothing then
            raise GatewayError(f"no deploy pipeline is configured for {app.name}")
        new = NewDeploy(
            app_id=app.id,
            ref=update.ref,
            old_sha=update.old,
            new_sha=update.new,
            pusher=session.identity.user_name,
            key_fingerprint=session.identity.fingerprint,
            subject=info.subject,
            author=info.author,
            mode=settings.mode,
            pipeline=pipeline.kind,  # a kind of the registry in pipelines/, nothing else
            note=session.options.note if session.options else None,
        )
        gated = None
        if quarantine is not None and expected_old is not None:
            gated = (quarantine, expected_old)
        return await self.runner.queue(new, gated)
