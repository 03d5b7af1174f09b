"""Identify a verified key's owner and decide whether they may use an app at a given level."""

from __future__ import annotations

from datetime import datetime

from .. import times
from ..errors import AccessDenied, GatewayError, InvalidName
from ..models import App, Identity, Role, SSHKey
from ..names import app_name
from ..store import Store, utcnow


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
