"""The keys page against forged and replayed requests, at the HTTP level: cross-site
sign-ins and posts, missing form tokens, stolen cookies after sign-out or revocation."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from tests import helpers
from tests.helpers import TIMEOUT, Admin, ServerThread, http_base, keygen, unique


@dataclass
class Reply:
    status: int
    set_cookies: list[str]
    body: str
    location: str = ""

    def field(self, name: str) -> str:
        """A hidden input's value in the page."""
        match = re.search(rf'name="{name}" value="([^"]*)"', self.body)
        assert match, f"no {name} field in:\n{self.body[:2000]}"
        return match.group(1)

    @property
    def signed_in(self) -> bool:
        return 'id="keys"' in self.body or 'id="no-keys"' in self.body


@dataclass
class Visitor:
    """What the page sees of a browser: a cookie jar and the Origin header it sends."""

    server: ServerThread
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        host, port = self.server.gateway.deploys.http_address  # type: ignore[misc]
        return f"http://{host}:{port}"

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None, origin: str | None = ""
    ) -> Reply:
        """origin "" sends the page's own origin, None sends none."""
        host, port = self.server.gateway.deploys.http_address  # type: ignore[misc]
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        headers = {}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if origin is not None:
            headers["Origin"] = origin or self.origin
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            set_cookies = response.headers.get_all("Set-Cookie") or []
            reply = Reply(
                response.status,
                set_cookies,
                response.read().decode(),
                response.getheader("Location", ""),
            )
        finally:
            conn.close()
        for header in set_cookies:
            for name, morsel in SimpleCookie(header).items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return reply

    def sign_in(self, token: str) -> Reply:
        form = self.request("GET", "/keys")
        reply = self.request("POST", "/keys/signin", {"token": token, "csrf": form.field("csrf")})
        assert reply.status == 303, reply.body
        return reply


def personal_token(admin: Admin, user: str) -> str:
    out = admin.ok("token", "create", unique("pt"), "--user", user, "--json")
    return json.loads(out)["token"]


def new_user(admin: Admin) -> tuple[str, str]:
    user = unique("kp")
    admin.ok("user", "add", user)
    return user, personal_token(admin, user)


def session_rows(server: ServerThread) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{server.config.storage.database}?mode=ro", uri=True)
    try:
        return db.execute("SELECT * FROM web_sessions").fetchall()
    finally:
        db.close()


def test_regression_cross_site_signin_is_refused(server: ServerThread, admin: Admin) -> None:
    _, token = new_user(admin)
    # Another port of the same host is the same site (SameSite cookies go there) but not
    # the same origin; "null" is what browsers send when they hide the origin.
    for origin in ("https://evil.example", "http://127.0.0.1:1", "null"):
        visitor = Visitor(server)
        csrf = visitor.request("GET", "/keys").field("csrf")
        reply = visitor.request(
            "POST", "/keys/signin", {"token": token, "csrf": csrf}, origin=origin
        )
        assert reply.status == 403, origin
        assert "Cross-site request refused." in reply.body
        assert not [c for c in reply.set_cookies if c.startswith("gw_session=")]
        assert "gw_session" not in visitor.cookies


def test_regression_signin_needs_the_presignin_token(server: ServerThread, admin: Admin) -> None:
    _, token = new_user(admin)
    bare = Visitor(server)
    assert bare.request("POST", "/keys/signin", {"token": token}).status == 403
    # A field without its cookie, and a cookie with another form's field.
    first, second = Visitor(server), Visitor(server)
    csrf = first.request("GET", "/keys").field("csrf")
    second.request("GET", "/keys")
    assert bare.request("POST", "/keys/signin", {"token": token, "csrf": csrf}).status == 403
    assert second.request("POST", "/keys/signin", {"token": token, "csrf": csrf}).status == 403
    for visitor in (bare, first, second):
        assert "gw_session" not in visitor.cookies
    # Without any Origin (not a browser's cross-site post), the tokens alone decide.
    reply = first.request("POST", "/keys/signin", {"token": token, "csrf": csrf}, origin=None)
    assert reply.status == 303 and "gw_session" in first.cookies


def test_regression_session_cookie_holds_no_token(server: ServerThread, admin: Admin) -> None:
    _, token = new_user(admin)
    visitor = Visitor(server)
    reply = visitor.sign_in(token)
    session = visitor.cookies["gw_session"]
    assert session != token and token not in session
    assert not [c for c in reply.set_cookies if token in c]
    cookie = next(c for c in reply.set_cookies if c.startswith("gw_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/keys" in cookie
    assert visitor.request("GET", "/keys").signed_in
    # The registry holds a hash of the session id, nothing that signs anyone in.
    rows = session_rows(server)
    digest = hashlib.sha256(session.encode()).hexdigest()
    assert [r for r in rows if digest in r]
    for row in rows:
        assert session not in row and token not in row
        assert not [v for v in row if isinstance(v, str) and token[:16] in v]


def test_regression_signout_ends_the_session_for_a_copied_cookie(
    server: ServerThread, admin: Admin
) -> None:
    user, token = new_user(admin)
    visitor = Visitor(server)
    visitor.sign_in(token)
    stolen = dict(visitor.cookies)
    page = visitor.request("GET", "/keys")
    csrf = page.field("csrf")
    reply = visitor.request("POST", "/keys/signout", {"csrf": csrf})
    assert reply.status == 303 and "gw_session" not in visitor.cookies
    thief = Visitor(server, stolen)
    assert not thief.request("GET", "/keys").signed_in
    pub = Path(f"{keygen(Path(server.config.storage.repos).parent / unique('k'))}.pub")
    added = thief.request("POST", "/keys", {"name": "x", "key": pub.read_text(), "csrf": csrf})
    assert added.status == 401
    assert json.loads(admin.ok("key", "list", user, "--json")) == []


def test_regression_token_or_user_removal_ends_sessions(server: ServerThread, admin: Admin) -> None:
    user, token = new_user(admin)
    visitor = Visitor(server)
    visitor.sign_in(token)
    before = len(session_rows(server))
    tokens = json.loads(admin.ok("token", "list", "--json"))
    name = next(t["name"] for t in tokens if t["user_name"] == user)
    admin.ok("token", "remove", name)
    assert not visitor.request("GET", "/keys").signed_in
    assert len(session_rows(server)) == before - 1

    other, other_token = new_user(admin)
    second = Visitor(server)
    second.sign_in(other_token)
    admin.ok("user", "remove", other)
    assert not second.request("GET", "/keys").signed_in
    assert len(session_rows(server)) == before - 1


def test_regression_signed_in_posts_check_origin(server: ServerThread, admin: Admin) -> None:
    user, token = new_user(admin)
    visitor = Visitor(server)
    visitor.sign_in(token)
    csrf = visitor.request("GET", "/keys").field("csrf")
    pub = Path(f"{keygen(Path(server.config.storage.repos).parent / unique('k'))}.pub")
    evil = "http://127.0.0.1:1"
    form = {"name": "planted", "key": pub.read_text(), "csrf": csrf}
    assert visitor.request("POST", "/keys", form, origin=evil).status == 403
    assert json.loads(admin.ok("key", "list", user, "--json")) == []
    assert visitor.request("POST", "/keys/signout", {"csrf": csrf}, origin=evil).status == 403
    assert visitor.request("GET", "/keys").signed_in  # a forged sign-out changed nothing
    # The same post from the page itself works.
    assert visitor.request("POST", "/keys", form).status == 303
    assert [k["name"] for k in json.loads(admin.ok("key", "list", user, "--json"))] == ["planted"]


def test_regression_a_pasted_private_key_is_never_sent_back(
    server: ServerThread, admin: Admin, tmp_path: Path
) -> None:
    """The refusal is shown, the name kept, and the key field comes back empty: nothing of
    the private key (its PEM body, its OpenSSH body without the header, a PuTTY file) is in
    the answer. A public key refused for another reason is kept for fixing."""
    user, token = new_user(admin)
    visitor = Visitor(server)
    visitor.sign_in(token)
    private = keygen(tmp_path / "id").read_text()
    body = "".join(private.splitlines()[1:-1])  # the base64 body, without its armour lines
    putty = "PuTTY-User-Key-File-3: ssh-ed25519\nPrivate-Lines: 1\nAAAAQdeadbeef\n"
    for pasted in (private, body, putty, private.splitlines()[1]):
        csrf = visitor.request("GET", "/keys").field("csrf")
        reply = visitor.request("POST", "/keys", {"name": "oops", "key": pasted, "csrf": csrf})
        assert reply.status == 422
        assert "this is a PRIVATE key: never share it" in reply.body
        assert 'value="oops"' in reply.body
        assert re.search(r'<textarea id="key"[^>]*></textarea>', reply.body), reply.body
        for line in pasted.splitlines():
            assert line.strip() not in reply.body
    assert json.loads(admin.ok("key", "list", user, "--json")) == []
    csrf = visitor.request("GET", "/keys").field("csrf")
    typo = "ssh-ed25519 not-base64 me@laptop"
    reply = visitor.request("POST", "/keys", {"name": "typo", "key": typo, "csrf": csrf})
    assert reply.status == 422 and f">{typo}</textarea>" in reply.body


def test_regression_an_expiring_token_adds_no_key_that_outlives_it(
    server: ServerThread, admin: Admin
) -> None:
    """Found in review: a personal token made with `--expires 1h` added a key that never
    expires, through the API (`POST /api/v1/user/keys`) and the keys page alike."""
    user = unique("exp")
    admin.ok("user", "add", user)
    made = json.loads(
        admin.ok("token", "create", unique("pt"), "--user", user, "--expires", "1h", "--json")
    )
    token, until = made["token"], made["expires_at"]
    directory = Path(server.config.storage.repos).parent
    keys = [Path(f"{keygen(directory / unique('k'))}.pub").read_text() for _ in range(3)]
    api = f"{http_base(server)}/api/v1/user/keys"

    refused = helpers.http("POST", api, token, {"name": "forever", "key": keys[0]})
    assert refused.status == 422
    message = refused.json()["error"]["message"]
    assert message == (
        f"the token of this request expires on {until}: a key it adds must expire no later "
        f'("expires": {until})'
    )
    later = helpers.http("POST", api, token, {"name": "later", "key": keys[0], "expires": "2d"})
    assert later.status == 422
    soon = (datetime.now(UTC) + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    within = helpers.http("POST", api, token, {"name": "within", "key": keys[0], "expires": soon})
    assert within.status == 201 and within.json()["expires_at"] is not None

    visitor = Visitor(server)
    visitor.sign_in(token)
    csrf = visitor.request("GET", "/keys").field("csrf")
    page = visitor.request("POST", "/keys", {"name": "page", "key": keys[1], "csrf": csrf})
    assert page.status == 422
    assert "the token you signed in with expires on" in page.body
    kept = visitor.request(
        "POST", "/keys", {"name": "page", "key": keys[1], "expires": soon, "csrf": csrf}
    )
    assert kept.status in (200, 303), kept.body
    listed = {
        k["name"]: k["expires_at"] for k in json.loads(admin.ok("key", "list", user, "--json"))
    }
    assert set(listed) == {"within", "page"} and all(listed.values())
