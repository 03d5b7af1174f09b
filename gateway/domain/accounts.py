"""Accounts: users, their SSH keys and apps' deploy keys, with the rules every front end shares."""

from __future__ import annotations

from datetime import datetime

from .. import names, times
from ..errors import NotFound, UsageError
from ..keys import PublicKey, parse_public_key
from ..models import SSHKey, User
from ..store import UserSummary, utcnow
from . import audit
from .part import Part

MAX_KEY_TEXT = 64 * 1024


class Accounts(Part):
    """Users, keys and deploy keys: each change validated and audited with its `actor`."""

    # -- users --

    async def create_user(self, name: str, *, actor: str) -> User:
        user = await self.store.create_user(names.user_name(name))
        await audit.record(self.store, "user_added", actor=actor, user=user.name)
        return user

    async def list_users(self) -> list[UserSummary]:
        return await self.store.list_users()

    async def get_user(self, name: str) -> User:
        return await self.store.get_user(name)

    async def user_summary(self, name: str) -> UserSummary:
        """A user with the counts `list_users` gives (NotFound if there is no such user)."""
        user = await self.store.get_user(name)
        for summary in await self.store.list_users():
            if summary.user.id == user.id:
                return summary
        return UserSummary(user, 0, 0)

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
                more=_limits(expires_at, "read" if read_only else None, scope),
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
                more=_limits(expires_at, access, None),
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


def expiry(text: str | None) -> datetime | None:
    """`--expires TEXT` as a time (None: never), or UsageError with the reason."""
    if text is None or text == "":
        return None
    try:
        return times.expiry(text, utcnow())
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
