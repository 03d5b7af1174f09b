"""Keys page sessions and the tokens that keep its forms from being posted cross-site.

- A sign-in opens a server-side session (gateway.domain.tokens): the cookie holds a random
  id, the registry only its SHA-256 with the personal token it acts with. It ends after
  `LIFETIME`, after `IDLE` without a request, at sign-out, or when the token (or its user)
  is removed.
- Before sign-in, the form carries a token tied to a short-lived cookie (a signed
  double-submit: the field is an HMAC of the cookie with this process's secret), so that a
  page elsewhere cannot sign a browser into an account of its choosing.
- Signed-in forms carry an HMAC of the session id with the same secret.
- Every POST must come from the page's own origin when the browser says where it comes
  from (`Origin`): cookies are not isolated by port, so another service on the same host
  could plant a pre-session cookie; it cannot make the browser lie about the origin.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlsplit

from aiohttp import web

from ..domain.facade import Domain
from ..models import ApiToken

# How long a sign-in form stays usable.
PRESIGNIN_SECONDS = 3600


def origin_of(url: str) -> str:
    """scheme://host[:port] as browsers send it in Origin (default ports left out)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # a Host header that is no host: matches no Origin
        return "invalid:"
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class Sessions:
    def __init__(self, domain: Domain, public_url: str) -> None:
        self.domain = domain
        self.public_url = public_url
        # Per process: a restart only makes open forms ask to be submitted again.
        self._secret = secrets.token_bytes(32)

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    # -- origin --

    def own_origin(self, request: web.Request) -> str:
        if self.public_url:
            return origin_of(self.public_url)
        return origin_of(f"{request.scheme}://{request.host}")

    def same_origin(self, request: web.Request) -> bool:
        """False when the browser says the request comes from another origin. Browsers
        send Origin with every cross-origin POST (and "null" when they hide it, refused
        here); without one, the request is not a cross-site form post by a browser, and the
        form tokens still apply."""
        origin = request.headers.get("Origin")
        return origin is None or origin.strip().lower() == self.own_origin(request)

    # -- before sign-in --

    def new_presignin(self) -> tuple[str, str]:
        """(cookie value, form field) for a sign-in form."""
        cookie = f"{secrets.token_urlsafe(24)}.{int(time.time())}"
        return cookie, self._mac("signin", cookie)

    def check_presignin(self, cookie: str, field: str) -> bool:
        _, _, issued = cookie.rpartition(".")
        if (
            not (issued.isascii() and issued.isdigit())
            or time.time() - int(issued) > PRESIGNIN_SECONDS
        ):
            return False
        return hmac.compare_digest(field.encode(), self._mac("signin", cookie).encode())

    # -- sessions --

    async def open(self, token: ApiToken) -> str:
        """A new session for a personal token; the id to put in the cookie."""
        return await self.domain.tokens.open_session(token)

    async def find(self, session_id: str) -> ApiToken | None:
        """The token of the live session with this id, or None."""
        return await self.domain.tokens.session_token(session_id)

    async def close(self, session_id: str) -> None:
        await self.domain.tokens.close_session(session_id)

    def csrf(self, session_id: str) -> str:
        return self._mac("session", session_id)

    def check_csrf(self, session_id: str, field: str) -> bool:
        return hmac.compare_digest(field.encode(), self.csrf(session_id).encode())
