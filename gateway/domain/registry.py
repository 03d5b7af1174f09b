"""The registry's business rules, shared by the admin CLI and the HTTP API."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .. import executors, names, times
from ..config import Config
from ..errors import GatewayError, NotFound, Unauthorized, UsageError
from ..git.repos import Repositories
from ..keys import PublicKey, parse_public_key
from ..logs import q
from ..models import (
    ApiToken,
    App,
    Deploy,
    Member,
    Role,
    SSHKey,
    User,
    WebhookDelivery,
)
from ..store import Store, UserSummary, utcnow
from . import audit
from .deploylog import read_log

log = logging.getLogger("gateway.service")

# Tokens are random secrets with a recognisable prefix (so secret scanners can spot a
# leaked one); only their SHA-256 is stored.
TOKEN_PREFIX = "ggw_"  # noqa: S105 (a prefix, not a secret)
MAX_KEY_TEXT = 64 * 1024


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True, slots=True)
class RemovedApp:
    app: App
    trashed: Path | None
    deploy_logs: Path | None = None  # where its deploy logs went (next to the repository)


@dataclass(frozen=True, slots=True)
class Grant:
    role: Role
    previous: Role | None


@dataclass(frozen=True, slots=True)
class DeployRecord:
    deploy: Deploy
    deliveries: list[WebhookDelivery]


class Registry:
    """Users, keys, apps, members, deploy records and API tokens.

    Every change is validated here and recorded in the audit trail with `actor`, so the CLI
    and the API cannot drift apart on a rule or a message.
    """

    def __init__(self, config: Config, store: Store, repos: Repositories | None = None) -> None:
        self.config = config
        self.store = store
        self.repos = repos or Repositories(
            config.storage.repos,
            config.git.max_input_size,
            git=config.git.binary,
            max_commit_size=config.limits.max_commit_size,
        )

    # -- users --

    async def create_user(self, name: str, *, actor: str) -> User:
        user = await self.store.create_user(names.user_name(name))
        await audit.record(self.store, "user_added", actor=actor, user=user.name)
        return user

    async def list_users(self) -> list[UserSummary]:
        return await self.store.list_users()

    async def get_user(self, name: str) -> User:
        return await self.store.get_user(name)

    async def remove_user(self, name: str, *, actor: str) -> User:
        user = await self.store.remove_user(name)
        await audit.record(self.store, "user_removed", actor=actor, user=user.name)
        return user

    # -- keys --

    async def add_key(
        self,
        user: str,
        key_name: str,
        text: str,
        *,
        actor: str,
        expires: str | None = None,
        read_only: bool = False,
        apps: list[str] | None = None,
        not_after: datetime | None = None,
        bound_by: str = "the key of this connection",
        expiry_field: str = "--expires",
    ) -> SSHKey:
        """Register a public key (one OpenSSH line) for a user, with the key policy of
        `keys.parse_public_key` and the one-account-per-key rule of the store; `expires`
        as `times.expiry` reads it (`90d`, `2027-01-31`), or never; `read_only` and `apps`
        limit what the key may do to reading and to those apps (within the user's roles).
        `not_after`: when what authorized the request (`bound_by`: an expiring key or
        certificate, token or session) stops working; no key it adds may outlive it."""
        user = names.user_name(user)
        key_name = names.key_name(key_name)
        expires_at = expiry(expires)
        _within(expires_at, not_after, bound_by, expiry_field)
        scope = None if apps is None else sorted({names.app_name(a) for a in apps})
        if scope is not None and not scope:
            raise UsageError("a key limited to apps needs at least one app")
        key = self._parse(text)
        async with self.store.transaction():
            if scope:
                # Only apps the user reaches, and one message for a missing app and an app
                # out of reach: a user limiting their own key learns nothing of other apps.
                account = await self.store.get_user(user)
                reached = {app.name for app, _ in await self.store.apps_for(account.id)}
                for name in scope:
                    if name not in reached:
                        raise NotFound(f"app '{name}' not found or not reachable by {user}")
            # Counted by the store as it adds: an account cannot grow the registry (and every
            # login's lookup table) without bound, whichever front end it uses.
            record = await self.store.add_key(
                user,
                key_name,
                key,
                expires_at,
                access="read" if read_only else None,
                scope=scope,
                limit=self.config.limits.max_keys_per_user,
            )
            await audit.record(
                self.store,
                "key_added",
                actor=actor,
                fingerprint=record.fingerprint,
                user=user,
                key=key_name,
                **_limits(expires_at, "read" if read_only else None, scope),
            )
        return record

    def _parse(self, text: str) -> PublicKey:
        if len(text) > MAX_KEY_TEXT:
            raise UsageError(f"public key text is too long (limit {MAX_KEY_TEXT} characters)")
        return parse_public_key(text)

    async def add_deploy_key(
        self,
        app: str,
        key_name: str,
        text: str,
        *,
        actor: str,
        write: bool = False,
        expires: str | None = None,
        not_after: datetime | None = None,
    ) -> SSHKey:
        """Register a deploy key: it reaches this app only, reading (or writing with
        `write`); a key already registered anywhere (a user's, another app's) is refused.
        `not_after`: the expiry of the token asking, which the key may not outlive."""
        app = names.app_name(app)
        key_name = names.key_name(key_name)
        expires_at = expiry(expires)
        # Review 2: an expiring operator token added deploy keys that never expire.
        _within(expires_at, not_after, "the token of this request", '"expires":')
        key = self._parse(text)
        access = "write" if write else "read"
        async with self.store.transaction():
            record = await self.store.add_deploy_key(
                app, key_name, key, access, expires_at, self.config.limits.max_keys_per_user
            )
            await audit.record(
                self.store,
                "deploy_key_added",
                actor=actor,
                fingerprint=record.fingerprint,
                app=app,
                key=key_name,
                **_limits(expires_at, access, None),
            )
        return record

    async def list_deploy_keys(self, app: str) -> list[SSHKey]:
        return await self.store.list_deploy_keys(app)

    async def remove_deploy_key(self, app: str, key_name: str, *, actor: str) -> SSHKey:
        key = await self.store.remove_deploy_key(app, key_name)
        await audit.record(
            self.store,
            "deploy_key_removed",
            actor=actor,
            fingerprint=key.fingerprint,
            app=app,
            key=key_name,
        )
        return key

    async def list_keys(self, user: str) -> list[SSHKey]:
        return await self.store.list_keys(user)

    async def remove_key(self, user: str, key_name: str, *, actor: str) -> SSHKey:
        key = await self.store.remove_key(user, key_name)
        await audit.record(
            self.store,
            "key_removed",
            actor=actor,
            fingerprint=key.fingerprint,
            user=user,
            key=key_name,
        )
        return key

    async def move_key(
        self, user: str, key_name: str, to_user: str, new_name: str | None = None, *, actor: str
    ) -> SSHKey:
        """Give a registered key to another account (a key registered on the wrong one: a
        key belongs to one account only, so it cannot simply be added to the other). One
        transaction: if the other account refuses it (no such user, the name is taken),
        the key stays where it was."""
        user, to_user = names.user_name(user), names.user_name(to_user)
        key_name = names.key_name(key_name)
        new_name = names.key_name(new_name) if new_name else key_name
        if user == to_user:
            raise UsageError(f"the key is already on account '{user}'")
        async with self.store.transaction():
            old = await self.store.remove_key(user, key_name)
            moved = await self.store.add_key(
                to_user,
                new_name,
                parse_public_key(old.public_key),
                old.expires_at,
                access=old.access,
                scope=None if old.scope is None else list(old.scope),
            )
            await audit.record(
                self.store,
                "key_moved",
                actor=actor,
                fingerprint=moved.fingerprint,
                user=user,
                key=key_name,
                to_user=to_user,
                to_key=new_name,
            )
        return moved

    # -- apps --

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

    # -- deploys --

    async def list_deploys(self, app: str, limit: int = 20) -> list[Deploy]:
        if not 1 <= limit <= 1000:
            raise UsageError("limit must be between 1 and 1000")
        await self.get_app(app)
        return await self.store.list_deploys(app, limit=limit)

    async def get_deploy(self, deploy_id: int) -> Deploy:
        deploy = await self.store.get_deploy(deploy_id)
        if deploy is None:
            raise NotFound(f"no deploy #{deploy_id}")
        return deploy

    async def deploy_record(self, deploy_id: int) -> DeployRecord:
        deploy = await self.get_deploy(deploy_id)
        return DeployRecord(deploy, await self.store.webhook_deliveries(deploy.id))

    async def deploy_log(self, deploy_id: int) -> str:
        deploy = await self.get_deploy(deploy_id)
        return await read_log(self.store, deploy.id)

    # -- API tokens --

    async def create_token(
        self, name: str, user: str | None = None, *, actor: str, expires: str | None = None
    ) -> tuple[ApiToken, str]:
        """A new token and its secret, shown once: only its hash is kept."""
        name = names.token_name(name)
        if user is not None:
            user = names.user_name(user)
        expires_at = expiry(expires)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = await self.store.create_token(name, user, hash_token(secret), expires_at)
        await audit.record(
            self.store,
            "token_created",
            actor=actor,
            token=name,
            user=user or "(operator)",
            **({"expires_at": times.text(expires_at)} if expires_at else {}),
        )
        return token, secret

    async def list_tokens(self) -> list[ApiToken]:
        return await self.store.list_tokens()

    async def remove_token(self, name: str, *, actor: str) -> ApiToken:
        token = await self.store.remove_token(name)
        await audit.record(
            self.store,
            "token_removed",
            actor=actor,
            token=name,
            user=token.user_name or "(operator)",
        )
        return token

    async def authenticate(self, secret: str) -> ApiToken | None:
        """The token with this secret, or None. Lookup is by hash: a 256-bit random secret
        cannot be guessed byte by byte from timing."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
            return None
        token = await self.store.token_by_hash(hash_token(secret))
        if token is not None and token.expired(utcnow()):
            raise TokenExpired(token)
        return token


def _limits(
    expires_at: datetime | None, access: str | None, scope: list[str] | None
) -> dict[str, object]:
    """A key's limits as its audit record lists them (only those it has)."""
    found: dict[str, object] = {}
    if expires_at is not None:
        found["expires_at"] = times.text(expires_at)
    if access is not None:
        found["access"] = access
    if scope is not None:
        found["apps"] = scope
    return found


class TokenExpired(Unauthorized):
    """A token past its expiry: told as such (its holder knows the secret)."""

    def __init__(self, token: ApiToken) -> None:
        when = times.text(token.expires_at) if token.expires_at else "?"
        super().__init__(f"this token expired on {when}: ask for a new one")
        self.token = token


def expiry(text: str | None) -> datetime | None:
    """`--expires TEXT` as a time (None: never), or UsageError with the reason."""
    if text is None or text == "":
        return None
    try:
        return times.expiry(text, utcnow())
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8") as file:
        file.write(text)


def _within(
    expires_at: datetime | None, not_after: datetime | None, bound_by: str, expiry_field: str
) -> None:
    """Refuse a key that would outlive what authorized adding it (an expiring key,
    certificate, token or session): nothing it adds may outlive it."""
    if not_after is not None and (expires_at is None or expires_at > not_after):
        when = times.text(not_after)
        raise UsageError(
            f"{bound_by} expires on {when}: a key it adds must expire no later "
            f"({expiry_field} {when})"
        )
