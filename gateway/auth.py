"""Identify a verified key's owner and decide whether they may use an app at a given level."""

from __future__ import annotations

from datetime import datetime

from . import times
from .errors import AccessDenied, GatewayError, InvalidName
from .models import App, Identity, Role
from .names import app_name
from .store import Store, utcnow


async def identify(store: Store, fingerprint: str) -> Identity | None:
    """The account that owns this key, or None for an unregistered key."""
    key = await store.find_key(fingerprint)
    if key is None:
        return None
    return Identity(key.user_id, key.user_name, key.id, key.name, key.fingerprint, key.expires_at)


class KeyRevoked(GatewayError):
    """The key a connection authenticated with was removed (or its user was) since."""

    code = "forbidden"

    def __init__(self) -> None:
        super().__init__("access denied: this SSH key is no longer registered")


class KeyExpired(KeyRevoked):
    """The connection's key expired since it logged in (a long-lived ControlMaster)."""

    def __init__(self, when: datetime | None) -> None:
        GatewayError.__init__(
            self, f"access denied: this SSH key expired on {times.text(when) if when else '?'}"
        )


async def recheck(store: Store, identity: Identity) -> None:
    """Raise KeyRevoked unless the connection's key is still registered to the same user.

    A connection can outlive its key: OpenSSH's ControlMaster runs every later command as a
    new session on one authenticated connection. So each session asks the registry again
    (one indexed lookup), by key id as well as fingerprint, so that a key removed and added
    back, or moved to another account, does not revive the old connection.
    """
    key = await store.find_key(identity.fingerprint)
    if key is None or key.id != identity.key_id or key.user_id != identity.user_id:
        raise KeyRevoked()
    if key.expired(utcnow()):
        raise KeyExpired(key.expires_at)


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
    if app is None:
        raise AccessDenied(name)
    role = await store.role_on(app.id, identity.user_id)
    if role is None or role < needed:
        raise AccessDenied(name)
    return app, role
