"""The SSH keys page: server-rendered HTML where a user lists, adds and deletes their keys.

Sign-in is with a personal API token, which opens a server-side session (see sessions.py):
the cookie holds the session id, never the token. Cookies are HttpOnly, SameSite=Strict and
scoped to the page; every form carries a CSRF token and every POST is checked for origin.
"""

from __future__ import annotations

import html
import logging
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .. import times
from ..domain.facade import Domain
from ..domain.tokens import LIFETIME, TokenExpired
from ..errors import GatewayError
from ..keys import looks_private
from ..logs import q
from ..models import ApiToken, SSHKey
from ..tables import expiry_text, shown
from .api import STATUS_OF  # the page answers with the API's status codes
from .sessions import PRESIGNIN_SECONDS, Sessions

log = logging.getLogger("gateway.http")

COOKIE = "gw_session"
PRESIGNIN_COOKIE = "gw_signin"
PATH = "/keys"
SECURITY_HEADERS = {
    # No script at all; inline styles only; forms post back here; never framed.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it, browsers send "Origin: null" on the page's own form posts,
    # which the origin check must refuse. The page's URLs say nothing worth hiding anyway.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
header{background:#1d2430;color:#fff;padding:12px 24px;display:flex;align-items:center;
justify-content:space-between}
header h1{font-size:17px;margin:0;font-weight:600}
header form{margin:0}
main{max-width:980px;margin:24px auto;padding:0 24px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:18px 22px;
margin-bottom:20px}
h2{font-size:16px;margin:0 0 12px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:7px 8px;border-bottom:1px solid #eceef2;vertical-align:middle}
td:not(:nth-child(3)){white-space:nowrap}
th{font-size:12px;text-transform:uppercase;color:#5b6472;letter-spacing:.03em}
code{font:13px ui-monospace,monospace;word-break:break-all}
label{display:block;font-weight:600;margin:10px 0 4px}
input[type=text],input[type=password],textarea{width:100%;box-sizing:border-box;
padding:8px;border:1px solid #c5cbd3;border-radius:4px;font:13px ui-monospace,monospace}
textarea{height:110px}
button{background:#2457c5;color:#fff;border:0;border-radius:4px;padding:8px 16px;
font-weight:600;cursor:pointer;margin-top:12px}
button.danger{background:#fff;color:#b42318;border:1px solid #e4a29c;margin:0;padding:5px 12px}
header button{background:#fff;color:#1d2430;margin:0;padding:5px 12px}
.error{background:#fdecea;border:1px solid #f5c2bd;color:#8a1c12;padding:10px 14px;
border-radius:4px;margin-bottom:14px}
.ok{background:#e8f5ec;border:1px solid #b7dfc3;color:#17603a;padding:10px 14px;
border-radius:4px;margin-bottom:14px}
.muted{color:#5b6472}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _layout(title: str, body: str, user: str | None = None, csrf: str = "") -> str:
    signout = ""
    if user is not None:
        signout = (
            f'<form method="post" action="{PATH}/signout">'
            f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
            f'<span class="muted" style="color:#c9d1dc">{_e(user)}</span> '
            '<button type="submit">Sign out</button></form>'
        )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>git-gateway · SSH keys</h1>{signout}</header><main>{body}</main>"
        "</body></html>"
    )


def _notice(error: str | None, ok: str | None) -> str:
    if error:
        return f'<div class="error" role="alert" id="error">{_e(error)}</div>'
    if ok:
        return f'<div class="ok" role="status" id="notice">{_e(ok)}</div>'
    return ""


def signin_page(csrf: str, error: str | None = None) -> str:
    body = (
        "<section><h2>Sign in</h2>"
        + _notice(error, None)
        + f'<form method="post" action="{PATH}/signin">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<label for="token">Personal access token</label>'
        '<input type="password" id="token" name="token" autocomplete="off" required>'
        '<p class="muted">Your operator creates it with '
        "<code>git-gateway token create NAME --user YOU</code>.</p>"
        '<button type="submit">Sign in</button></form></section>'
    )
    return _layout("Sign in · SSH keys", body)


def keys_page(
    user: str,
    keys: list[SSHKey],
    csrf: str,
    *,
    error: str | None = None,
    ok: str | None = None,
    form: dict[str, str] | None = None,
) -> str:
    form = form or {}
    now = times.now()
    if keys:
        rows = "".join(
            f'<tr data-key="{_e(k.name)}"><td>{_e(k.name)}</td><td>{_e(k.algorithm)}</td>'
            f"<td><code>{_e(k.fingerprint)}</code></td><td>{_e(shown(k.created_at))}</td>"
            f"<td>{_e(shown(k.last_used_at, 'never'))}</td>"
            f"<td>{_e(expiry_text(k.expires_at, now))}</td><td>{_e(k.reach())}</td><td>"
            f'<form method="post" action="{PATH}/delete">'
            f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
            f'<input type="hidden" name="name" value="{_e(k.name)}">'
            f'<button class="danger" type="submit" aria-label="Delete {_e(k.name)}">Delete'
            "</button></form></td></tr>"
            for k in keys
        )
        table = (
            '<table id="keys"><thead><tr><th>Name</th><th>Type</th><th>Fingerprint</th>'
            "<th>Added</th><th>Last used</th><th>Expires</th><th>Reaches</th><th></th></tr>"
            "</thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    else:
        table = '<p class="muted" id="no-keys">No SSH key yet: add one below to push with git.</p>'
    body = (
        _notice(error, ok)
        + f"<section><h2>Your SSH keys</h2>{table}</section>"
        + "<section><h2>Add an SSH key</h2>"
        f'<form method="post" action="{PATH}">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<label for="name">Name</label>'
        f'<input type="text" id="name" name="name" placeholder="laptop" '
        f'value="{_e(form.get("name", ""))}" required maxlength="64">'
        '<label for="key">Public key</label>'
        '<textarea id="key" name="key" required placeholder="ssh-ed25519 AAAA... you@example.com">'
        f"{_e(form.get('key', ''))}</textarea>"
        '<label for="expires">Expires (optional)</label>'
        '<input type="text" id="expires" name="expires" placeholder="90d or 2027-01-31; '
        f'empty: never" value="{_e(form.get("expires", ""))}" maxlength="40">'
        '<p class="muted">Paste the whole content of your <code>~/.ssh/id_ed25519.pub</code> '
        "(create one with <code>ssh-keygen -t ed25519 -C you@example.com</code>). "
        "A key belongs to one account only.</p>"
        '<button type="submit">Add key</button></form></section>'
    )
    return _layout("SSH keys", body, user, csrf)


def _echo(form: dict[str, str]) -> dict[str, str]:
    """What a refused form is shown again with: what was typed, but the key field only when
    it is one line and holds nothing of a private key. A private key pasted by mistake is
    never sent back (the answer could be cached, logged by a proxy, or shown to whoever
    looks at the screen next); the refusal says why the field is empty."""
    text = form.get("key", "")
    if looks_private(text) or len(text.strip().splitlines()) > 1:
        return {**form, "key": ""}
    return form


class KeysPage:
    def __init__(self, domain: Domain, sessions: Sessions, secure_cookies: bool) -> None:
        self.domain = domain
        self.sessions = sessions
        self.secure = secure_cookies

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(PATH, self.show),
            web.post(PATH, self.add),
            web.post(f"{PATH}/delete", self.delete),
            web.post(f"{PATH}/signin", self.signin),
            web.post(f"{PATH}/signout", self.signout),
        ]

    @staticmethod
    def _html(text: str, status: int = 200) -> web.Response:
        return web.Response(
            text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS
        )

    @staticmethod
    def _redirect(query: str = "") -> web.Response:
        return web.Response(status=303, headers={**SECURITY_HEADERS, "Location": PATH + query})

    def _cookie(self, response: web.StreamResponse, name: str, value: str, seconds: int) -> None:
        response.set_cookie(
            name,
            value,
            path=PATH,
            httponly=True,
            samesite="Strict",
            secure=self.secure,
            max_age=seconds,
        )

    def _signin(self, error: str | None = None, status: int = 200) -> web.Response:
        """The sign-in form, with a fresh pre-session cookie and its token."""
        cookie, field = self.sessions.new_presignin()
        response = self._html(signin_page(field, error), status)
        self._cookie(response, PRESIGNIN_COOKIE, cookie, PRESIGNIN_SECONDS)
        return response

    def _cross_site(self, request: web.Request) -> web.Response | None:
        if self.sessions.same_origin(request):
            return None
        log.warning(
            "event=keys_page_refused reason=cross_origin path=%s origin=%s peer=%s",
            q(request.path),
            q(request.headers.get("Origin", "")[:200]),
            q(request.remote),
        )
        return self._html(signin_page("", "Cross-site request refused."), 403)

    async def _session(self, request: web.Request) -> tuple[ApiToken, str] | None:
        session_id = request.cookies.get(COOKIE, "")
        token = await self.sessions.find(session_id) if session_id else None
        if token is None or not token.personal or token.expired(times.now()):
            return None
        return token, session_id

    async def _form(self, request: web.Request) -> dict[str, str]:
        data = await request.post()
        return {k: v for k, v in data.items() if isinstance(v, str)}

    async def show(self, request: web.Request) -> web.Response:
        session = await self._session(request)
        if session is None:
            return self._signin()
        token, session_id = session
        ok = None
        if "added" in request.query:
            ok = f"Key '{request.query['added'][:64]}' added."
        elif "deleted" in request.query:
            ok = f"Key '{request.query['deleted'][:64]}' deleted."
        return await self._render(token, session_id, ok=ok)

    async def _render(
        self, token: ApiToken, session_id: str, status: int = 200, **kw: Any
    ) -> web.Response:
        user = token.user_name or ""  # sessions only hold personal tokens
        keys = await self.domain.accounts.list_keys(user)
        return self._html(keys_page(user, keys, self.sessions.csrf(session_id), **kw), status)

    async def _authorized_form(
        self, request: web.Request
    ) -> tuple[ApiToken, str, dict[str, str]] | web.Response:
        refused = self._cross_site(request)
        if refused is not None:
            return refused
        session = await self._session(request)
        if session is None:
            return self._signin("Your session has ended: sign in again.", 401)
        form = await self._form(request)
        token, session_id = session
        if not self.sessions.check_csrf(session_id, form.get("csrf", "")):
            log.info("event=keys_page_refused reason=csrf_token peer=%s", q(request.remote))
            return self._signin("The form expired: sign in again.", 403)
        return token, session_id, form

    async def add(self, request: web.Request) -> web.Response:
        checked = await self._authorized_form(request)
        if isinstance(checked, web.Response):
            return checked
        token, session_id, form = checked
        user = token.user_name or ""
        name, text = form.get("name", "").strip(), form.get("key", "")
        try:
            expires = form.get("expires", "").strip() or None
            key = await self.domain.accounts.add_key(
                user,
                name,
                text,
                actor=user,
                expires=expires,
                # The session's token may expire: the keys it adds may not outlive it.
                not_after=token.expires_at,
                bound_by="the token you signed in with",
                expiry_field="Expires:",
            )
        except GatewayError as exc:
            return await self._render(
                token, session_id, STATUS_OF.get(exc.code, 400), error=str(exc), form=_echo(form)
            )
        return self._redirect(f"?added={quote(key.name)}")

    async def delete(self, request: web.Request) -> web.Response:
        checked = await self._authorized_form(request)
        if isinstance(checked, web.Response):
            return checked
        token, session_id, form = checked
        user = token.user_name or ""
        try:
            key = await self.domain.accounts.remove_key(user, form.get("name", ""), actor=user)
        except GatewayError as exc:
            return await self._render(
                token, session_id, STATUS_OF.get(exc.code, 400), error=str(exc)
            )
        return self._redirect(f"?deleted={quote(key.name)}")

    async def signin(self, request: web.Request) -> web.Response:
        refused = self._cross_site(request)
        if refused is not None:
            return refused
        form = await self._form(request)
        presignin = request.cookies.get(PRESIGNIN_COOKIE, "")
        if not self.sessions.check_presignin(presignin, form.get("csrf", "")):
            log.info("event=keys_page_refused reason=presignin_token peer=%s", q(request.remote))
            return self._signin("The sign-in form expired: try again.", 403)
        try:
            token = await self.domain.tokens.authenticate(form.get("token", "").strip())
        except TokenExpired as exc:
            return self._signin(f"{str(exc)[0].upper()}{str(exc)[1:]}.", 401)
        if token is None:
            return self._signin("Unknown token.", 401)
        if not token.personal:
            return self._signin("This is an operator token: sign in with a personal token.", 403)
        session_id = await self.sessions.open(token)
        response = self._redirect()
        self._cookie(response, COOKIE, session_id, int(LIFETIME.total_seconds()))
        response.del_cookie(PRESIGNIN_COOKIE, path=PATH)
        return response

    async def signout(self, request: web.Request) -> web.Response:
        checked = await self._authorized_form(request)
        if isinstance(checked, web.Response) and checked.status != 401:
            return checked  # cross-site, or without the form's token: the session stays
        await self.sessions.close(request.cookies.get(COOKIE, ""))
        response = self._redirect()
        response.del_cookie(COOKIE, path=PATH)
        return response
