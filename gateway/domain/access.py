"""Identify a verified key's owner, decide whether they may use an app at a given level, and
audit logins and refusals (`Access`, the facade's part every front end's authentication uses)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING

from .. import times
from ..errors import AccessDenied, GatewayError, InvalidName, NotFound
from ..models import App, Identity, Role, SSHKey
from ..names import app_name
from ..store import Store, utcnow
from . import audit
from .part import Part

if TYPE_CHECKING:
    from .facade import Domain

log = logging.getLogger("gateway.server")

# Recording a key's "last used" is a write; once a minute per key is enough.
TOUCH_INTERVAL_SECONDS = 60


async def identify(store: Store, fingerprint: str) -> Identity | None:
    """The account that owns this key, or None for an unregistered key."""
    key = await store.find_key(fingerprint)
    if key is None:
        return None
    return identity_of(key)


def identity_of(key: SSHKey) -> Identity:
    # A deploy key acts for its app only, and is named after it in logs and records.
    name = key.user_name or "" if key.user_id is not None else f"deploy:{key.app_name}/{key.name}"
    return Identity(
        key.user_id,
        name,
        key.id,
        key.name,
        key.fingerprint,
        key.expires_at,
        app_id=key.app_id,
        app_name=key.app_name,
        access=key.access,
        scope=key.scope,
    )


class KeyRevoked(GatewayError):
    """The key a connection authenticated with was removed (or its user was) since."""

    code = "forbidden"

    def __init__(self) -> None:
        super().__init__("access denied: this SSH key is no longer registered")


class CertificateRevoked(KeyRevoked):
    """The connection's certificate was revoked or expired since it logged in."""

    def __init__(self, text: str) -> None:
        GatewayError.__init__(self, text)


class KeyExpired(KeyRevoked):
    """The connection's key expired since it logged in (a long-lived ControlMaster)."""

    def __init__(self, when: datetime | None) -> None:
        GatewayError.__init__(
            self, f"access denied: this SSH key expired on {times.text(when) if when else '?'}"
        )


async def recheck(store: Store, identity: Identity) -> Identity:
    """Raise KeyRevoked unless the connection's key is still registered to the same user.

    A connection can outlive its key: OpenSSH's ControlMaster runs every later command as a
    new session on one authenticated connection. So each session asks the registry again
    (one indexed lookup), by key id as well as fingerprint, so that a key removed and added
    back, or moved to another account, does not revive the old connection.
    """
    key = await store.find_key(identity.fingerprint)
    if key is None or key.id != identity.key_id or key.user_id != identity.user_id:
        raise KeyRevoked()
    if key.app_id != identity.app_id:
        raise KeyRevoked()
    if key.expired(utcnow()):
        raise KeyExpired(key.expires_at)
    # The scope as it is now: an app removed since (and maybe created again) is not in it.
    return identity_of(key)


async def authorize(store: Store, identity: Identity, name: str, needed: Role) -> tuple[App, Role]:
    """Return the app and the caller's role if it is at least `needed`.

    A malformed name, a missing app and an app the caller cannot reach all raise the same
    AccessDenied, so nobody learns which apps exist.
    """
    try:
        app_name(name)
    except InvalidName:
        raise AccessDenied(name) from None
    app = await store.get_app(name)
    if identity.deploy and (app is None or app.id != identity.app_id):
        # The same words for a missing app and another tenant's: only the key's own app,
        # which its holder knows, is named.
        raise AccessDenied(
            name, f"this is a deploy key of {identity.app_name}, it reaches only that app"
        )
    if app is None:
        raise AccessDenied(name)
    role = await role_of(store, identity, app)
    if role is None:
        raise AccessDenied(name)
    if role < needed:
        # The caller reads this app, so it knows the app exists: say what is missing.
        raise await _why_not(store, identity, app, role)
    return app, role


async def _why_not(store: Store, identity: Identity, app: App, role: Role) -> GatewayError:
    """What keeps a caller who can read `app` from writing to it: the key or the role."""
    if identity.deploy:
        return DeployKeyReadOnly(identity)
    if identity.access == "read" and identity.user_id is not None:
        user_role = await store.role_on(app.id, identity.user_id)
        if user_role is not None and user_role >= Role.WRITE:
            return KeyReadOnly(identity, app.name)
    return WriteRoleNeeded(app.name, role)


class WriteRoleNeeded(AccessDenied):
    """A member who can read the app pushes: told which role it takes (audited as a denial)."""

    code = "forbidden"

    def __init__(self, name: str, role: Role) -> None:
        GatewayError.__init__(
            self,
            f"you have {role.label} access to '{name}': pushing needs the write role; "
            "ask its owner or an admin",
        )
        self.name = name


class KeyReadOnly(AccessDenied):
    """A writer pushing with a key limited to reading (`key add --read-only`)."""

    code = "forbidden"

    def __init__(self, identity: Identity, name: str) -> None:
        GatewayError.__init__(
            self,
            f'the SSH key "{identity.key_name}" of {identity.user_name} is read-only: '
            "it cannot push (use a key added without --read-only)",
        )
        self.name = name


class DeployKeyReadOnly(GatewayError):
    code = "forbidden"

    def __init__(self, identity: Identity) -> None:
        super().__init__(
            f'the deploy key "{identity.key_name}" of {identity.app_name} is read-only: '
            "it cannot push (an operator can add one with --write)"
        )


async def role_of(store: Store, identity: Identity, app: App) -> Role | None:
    """What this key may do on this app: a deploy key its access on its own app only; a
    user key its user's role, within the key's scope and access limit."""
    if identity.user_id is None:
        if app.id != identity.app_id:
            return None
        return Role.WRITE if identity.access == "write" else Role.READ
    if identity.scope is not None and app.name not in identity.scope:
        return None
    role = await store.role_on(app.id, identity.user_id)
    if role is not None and identity.access == "read":
        return Role.READ
    return role


class Access(Part):
    """Who a key or certificate is, what it may reach, and the audit trail of logins, of
    refusals and of failed logins (counted per source and minute, see audit.AuthFailures)."""

    def __init__(self, domain: Domain) -> None:
        super().__init__(domain)
        self.failures = audit.AuthFailures(domain.store)
        self._last_touch: dict[int, float] = {}

    async def identify(self, fingerprint: str) -> Identity | None:
        """The account that owns this key, or None for an unregistered key."""
        return await identify(self.store, fingerprint)

    async def recheck(self, identity: Identity) -> Identity:
        """The identity as it is now, or KeyRevoked (see `recheck`): a key still registered
        to the same account; a certificate's account still there, with the same id (its
        validity and revocation are the SSH layer's to check)."""
        if identity.certificate is None:
            return await recheck(self.store, identity)
        try:
            user = await self.store.get_user(identity.user_name)
        except NotFound:
            raise KeyRevoked() from None
        if user.id != identity.user_id:
            raise KeyRevoked()
        return identity

    async def authorize(self, identity: Identity, name: str, needed: Role) -> tuple[App, Role]:
        """The app and the caller's role, or one AccessDenied (see `authorize`)."""
        return await authorize(self.store, identity, name, needed)

    async def reachable(self, identity: Identity) -> list[tuple[App, Role]]:
        """The apps this key reaches, with what it may do there (its limits applied)."""
        if identity.user_id is None:
            return []
        found = []
        for app, _ in await self.store.apps_for(identity.user_id):
            role = await role_of(self.store, identity, app)
            if role is not None:
                found.append((app, role))
        return found

    async def record_key_use(self, identity: Identity) -> None:
        """Update the key's "last used", at most once a minute per key (it is a write)."""
        now = asyncio.get_running_loop().time()
        last = self._last_touch.get(identity.key_id)
        if last is not None and now - last < TOUCH_INTERVAL_SECONDS:
            return
        self._last_touch[identity.key_id] = now
        try:
            await self.store.touch_key(identity.key_id, utcnow())
        except Exception:
            # Bookkeeping must never cost the user their session.
            log.exception("event=touch_key_failed key_id=%d", identity.key_id)

    async def logged_in(self, identity: Identity, source: str) -> None:
        """`auth_ok`: the key, or the certificate (its id, serial, principal and CA)."""
        cert = identity.certificate
        detail: dict[str, object] = {"key": identity.key_name}
        if cert is not None:
            detail = {
                "certificate": cert.key_id,
                "serial": cert.serial,
                "principal": cert.principal,
                "ca": cert.ca_fingerprint,
            }
        await audit.record(
            self.store,
            "auth_ok",
            actor=identity.user_name,
            fingerprint=identity.fingerprint,
            source=source,
            more=detail,
        )

    async def login_refused(self, identity: Identity, source: str, why: str) -> None:
        """`auth_refused`: a registered key that may not log in (`why`: "expired"), used by
        whoever holds it; the refusal is the account's to see."""
        await audit.record(
            self.store,
            "auth_refused",
            actor=identity.user_name,
            fingerprint=identity.fingerprint,
            source=source,
            key=identity.key_name,
            reason=f"key {why}",
        )

    def login_failed(
        self, source: str, kind: str, reason: str, fingerprint: str = "", attempts: int = 0
    ) -> None:
        """An unauthenticated connection ended: counted in memory per source and minute,
        written by `flush_failures` (no registry write per TCP connect)."""
        self.failures.add(source, kind, reason, fingerprint=fingerprint, attempts=attempts)

    async def flush_failures(self, now: datetime | None = None, everything: bool = False) -> int:
        """Write the failed-login counts of finished minutes (all with `everything`)."""
        return await self.failures.flush(now, everything)

    async def denied(
        self, identity: Identity, source: str, refusal: GatewayError, command: str
    ) -> None:
        """`access_denied`: a command refused for an app (AccessDenied) or for a key no
        longer valid (KeyRevoked, with why)."""
        reason = {}
        if isinstance(refusal, KeyRevoked):
            expired = isinstance(refusal, KeyExpired)
            reason = {"reason": "key expired" if expired else "key no longer registered"}
        await audit.record(
            self.store,
            "access_denied",
            actor=identity.user_name,
            fingerprint=identity.fingerprint,
            source=source,
            app=refusal.name[:100] if isinstance(refusal, AccessDenied) else "",
            command=command[:200],
            more=reason,
        )
