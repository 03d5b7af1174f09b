"""API tokens (only their hash is kept) and the keys page's sessions, which act with one."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from .. import names, times
from ..errors import Unauthorized
from ..models import ApiToken
from ..store import utcnow
from . import audit
from .accounts import expiry
from .part import Part

if TYPE_CHECKING:
    from .facade import Domain

# Tokens are random secrets with a recognisable prefix (so secret scanners can spot a
# leaked one); only their SHA-256 is stored.
TOKEN_PREFIX = "ggw_"  # noqa: S105 (a prefix, not a secret)
# A token's "last used" is a write: once a minute is enough.
TOUCH_INTERVAL = 60.0

# Keys page sessions: a sign-in ends after LIFETIME, or after IDLE without a request.
LIFETIME = timedelta(hours=8)
IDLE = timedelta(hours=1)
# A user signed in from more browsers than this loses the oldest sessions.
MAX_PER_TOKEN = 20
# Recording "last seen" is a write: once a minute is enough for the idle expiry.
TOUCH_SECONDS = 60


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Tokens(Part):
    """API tokens and keys page sessions: created, found by secret, used and removed."""

    def __init__(self, domain: Domain) -> None:
        super().__init__(domain)
        self._touched: dict[int, float] = {}

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
            more={"expires_at": times.text(expires_at)} if expires_at else None,
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

    async def record_use(self, token: ApiToken) -> None:
        """Update the token's "last used", at most once a minute (it is a write); a failure
        is bookkeeping, never the request's."""
        now = time.monotonic()
        if now - self._touched.get(token.id, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
            return
        self._touched[token.id] = now
        with contextlib.suppress(Exception):
            await self.store.touch_token(token.id, utcnow())

    # -- keys page sessions: the cookie holds a random id, the registry only its SHA-256 --

    async def open_session(self, token: ApiToken) -> str:
        """A new session for a personal token; the id to put in the cookie."""
        now = times.now()
        await self.store.prune_web_sessions(now, now - IDLE)
        session_id = secrets.token_urlsafe(32)
        await self.store.create_web_session(
            _session_hash(session_id), token.id, now, now + LIFETIME, MAX_PER_TOKEN
        )
        return session_id

    async def session_token(self, session_id: str) -> ApiToken | None:
        """The token of the live session with this id, or None (an expired one is deleted)."""
        if not session_id or len(session_id) > 100:
            return None
        id_hash = _session_hash(session_id)
        session = await self.store.web_session(id_hash)
        if session is None:
            return None
        now = times.now()
        if session.expires_at <= now or session.last_seen_at <= now - IDLE:
            await self.store.remove_web_session(id_hash)
            return None
        if session.last_seen_at <= now - timedelta(seconds=TOUCH_SECONDS):
            await self.store.touch_web_session(id_hash, now)
        return session.token

    async def close_session(self, session_id: str) -> None:
        if session_id and len(session_id) <= 100:
            await self.store.remove_web_session(_session_hash(session_id))


class TokenExpired(Unauthorized):
    """A token past its expiry: told as such (its holder knows the secret)."""

    def __init__(self, token: ApiToken) -> None:
        when = times.text(token.expires_at) if token.expires_at else "?"
        super().__init__(f"this token expired on {when}: ask for a new one")
        self.token = token
