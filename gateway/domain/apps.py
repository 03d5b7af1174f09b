"""Apps and their members: an app's repository and registry row made and removed together."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import executors, names
from ..errors import GatewayError, NotFound, UsageError
from ..logs import q
from ..models import App, Member, Role
from . import audit
from .deploylog import read_log
from .part import Part

# The logger these lines had before the facade was split by aggregate: operators filter on it.
log = logging.getLogger("gateway.service")


@dataclass(frozen=True, slots=True)
class RemovedApp:
    app: App
    trashed: Path | None
    deploy_logs: Path | None = None  # where its deploy logs went (next to the repository)


@dataclass(frozen=True, slots=True)
class Grant:
    role: Role
    previous: Role | None


class Apps(Part):
    """Apps, their repositories and members: each change validated and audited with `actor`."""

    async def create_app(
        self, name: str, owner: str, branch: str | None = None, *, actor: str
    ) -> App:
        """Register an app and create its bare repository; neither exists if either fails."""
        name = names.app_name(name)
        branch = names.branch_name(branch or self.config.deploy.branch)
        owner = names.user_name(owner)
        path = self.repos.path_for(name)
        if path.exists():
            raise GatewayError(f"a repository already exists at {path}: move it away first")
        created = False
        try:
            # One transaction: the app row, its owner's rights and the audit event are all
            # there once its repository exists, or none is.
            async with self.store.transaction():
                app = await self.store.create_app(name, owner, branch)
                await executors.run(self.repos.create, name, branch)
                created = True
                await audit.record(
                    self.store, "app_created", actor=actor, app=name, owner=owner, branch=branch
                )
        except BaseException:
            if created:  # the registry could not commit: the repository goes too
                await executors.run(shutil.rmtree, self.repos.path_for(name), True)
            raise
        await self.domain.homes.adopt(app)
        return app

    async def list_apps(self) -> list[App]:
        return await self.store.list_apps()

    async def get_app(self, name: str) -> App:
        app = await self.store.get_app(name)
        if app is None:
            raise NotFound(f"no such app '{name}'")
        return app

    async def remove_app(self, name: str, *, actor: str) -> RemovedApp:
        """Unregister an app; its repository goes to the trash, from where it can be
        restored, and its deploy logs with it (`<app>.deploys/` next to `<app>.git`): the
        deploy rows go with the app, and nothing a later app could read stays behind."""
        app = await self.get_app(name)
        deploy_ids = await self.store.app_deploy_ids(app.name)
        trashed = None
        if self.repos.path_for(app.name).exists():
            trashed = await executors.run(self.repos.trash, app.name)
        # The logs are written out before the records go (they go with them).
        logs = await self._archive_logs(app.name, deploy_ids, trashed)
        try:
            await self.store.remove_app(app.name)
        except BaseException:
            if trashed is not None:  # put the repository back where it was
                trashed.rename(self.repos.path_for(app.name))
            if logs is not None:
                await executors.run(shutil.rmtree, logs, True)
            raise
        await audit.record(
            self.store,
            "app_removed",
            actor=actor,
            app=app.name,
            trash=str(trashed or ""),
            deploy_logs=str(logs or ""),
        )
        return RemovedApp(app, trashed, logs)

    async def _archive_logs(
        self, app: str, deploy_ids: list[int], trashed: Path | None
    ) -> Path | None:
        """Each deploy's log as `<id>.log` in `<app>.deploys/` next to the trashed repository."""
        target: Path | None = None
        try:
            for deploy_id in deploy_ids:
                text = await read_log(self.store, deploy_id)
                if not text:
                    continue
                if target is None:
                    target = self.repos.trash_companion(app, trashed, ".deploys")
                    await executors.run(target.mkdir, 0o700)
                await executors.run(_write_private, target / f"{deploy_id}.log", text)
        except OSError as exc:
            # The operator should know; the removal goes on (nothing a later app could read
            # stays behind: the records go with the app).
            log.error("event=deploy_logs_not_archived app=%s error=%s", app, q(exc))
        return target

    async def grant(self, app: str, user: str, role: str, *, actor: str) -> Grant:
        try:
            parsed = Role.parse(role)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        previous = await self.store.grant(app, user, parsed)
        await audit.record(
            self.store,
            "member_granted",
            actor=actor,
            app=app,
            user=user,
            role=parsed.label,
            previous=previous.label if previous else None,
        )
        return Grant(parsed, previous)

    async def revoke(self, app: str, user: str, *, actor: str) -> Role:
        role = await self.store.revoke(app, user)
        await audit.record(
            self.store, "member_revoked", actor=actor, app=app, user=user, role=role.label
        )
        return role

    async def members(self, app: str) -> list[Member]:
        return await self.store.list_members(app)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8") as file:
        file.write(text)
