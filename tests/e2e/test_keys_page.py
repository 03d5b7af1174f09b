"""The SSH keys page in real headless Chromium: sign in, add a key, push with it, delete it."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Admin, Client, ServerThread, http_base, keygen, keygen_fingerprint, unique

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# CI sets this, so that a missing browser fails the run instead of skipping the test.
REQUIRED = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"
# As the machine's notes say: without these, Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("playwright is not installed")
    if not Path(CHROMIUM).exists():
        if REQUIRED:
            pytest.fail(f"chromium not found at {CHROMIUM}")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    yield tab
    context.close()


def cli(admin: Admin, *args: str) -> str:
    """The admin CLI, from a thread of its own: Playwright's sync API keeps an event loop
    running in the test's thread, and the CLI starts one with asyncio.run."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(admin.ok, *args).result()


def personal_token(admin: Admin, user: str) -> str:
    return json.loads(cli(admin, "token", "create", unique("web"), "--user", user, "--json"))[
        "token"
    ]


def test_add_a_key_in_the_page_then_push_with_it(
    server: ServerThread, admin: Admin, page: Any, tmp_path: Path
) -> None:
    user, other, app = unique("webu"), unique("webo"), unique("webapp")
    for name in (user, other):
        cli(admin, "user", "add", name)
    cli(admin, "app", "create", app, "--owner", user)
    token = personal_token(admin, user)
    key = keygen(tmp_path / "id_ed25519", comment=f"{user}@laptop")
    taken = keygen(tmp_path / "other_key")
    cli(admin, "key", "add", other, "theirs", f"{taken}.pub")
    base = http_base(server)

    # Signing in: a wrong token is refused, the personal token opens the page.
    page.goto(f"{base}/keys")
    page.fill("#token", "ggw_wrong")
    page.click('button:has-text("Sign in")')
    assert page.text_content("#error") == "Unknown token."
    page.fill("#token", token)
    page.click('button:has-text("Sign in")')
    assert page.is_visible("#no-keys")

    # Adding: the key shows with its SHA256 fingerprint, exactly as ssh-keygen prints it.
    page.fill("#name", "laptop")
    page.fill("#key", Path(f"{key}.pub").read_text())
    page.click('button:has-text("Add key")')
    assert page.text_content("#notice") == "Key 'laptop' added."
    row = page.locator('tr[data-key="laptop"]')
    assert keygen_fingerprint(Path(f"{key}.pub")) in row.inner_text()
    assert "ssh-ed25519" in row.inner_text() and "never" in row.inner_text()

    # The API's messages: a key of another account, a bad key, a duplicate name.
    page.fill("#name", "stolen")
    page.fill("#key", Path(f"{taken}.pub").read_text())
    page.click('button:has-text("Add key")')
    assert page.text_content("#error") == "this SSH key is already used by another account"
    assert page.input_value("#name") == "stolen"  # the form keeps what was typed
    bad = "ssh-ed25519 not-base64"
    page.fill("#key", bad)
    page.click('button:has-text("Add key")')
    with ThreadPoolExecutor(1) as pool:
        _, _, err = pool.submit(admin, "key", "add", user, "x", "-", stdin=bad).result()
    assert f"error: {page.text_content('#error')}\n" == err
    page.fill("#name", "laptop")
    page.fill("#key", Path(f"{tmp_path / 'id_ed25519'}.pub").read_text())
    page.click('button:has-text("Add key")')
    assert "already registered" in page.text_content("#error")
    assert page.locator("#keys tbody tr").count() == 1

    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{base}/keys")
    page.screenshot(path=str(ARTIFACTS / "keys-page.png"), full_page=True)

    # The key added in the page pushes.
    client = Client(tmp_path / "home", key, server, name=user)
    repo = client.new_repo(tmp_path / "work")
    client.git("push", "-q", client.url(app), "main", cwd=repo, check=True)
    page.reload()
    last_used = page.locator('tr[data-key="laptop"] td').nth(4).inner_text()
    assert last_used != "never" and last_used.startswith("20")

    # Deleting it in the page locks that key out.
    page.click('button[aria-label="Delete laptop"]')
    assert page.text_content("#notice") == "Key 'laptop' deleted."
    assert page.is_visible("#no-keys")
    assert client.git("ls-remote", client.url(app), check=False).returncode != 0

    # The cookie holds a session id, not the token; signing out ends that session, so a
    # copy of the cookie taken before is worth nothing afterwards.
    session = next(c for c in page.context.cookies() if c["name"] == "gw_session")
    assert session["value"] != token and token not in session["value"]
    page.click('button:has-text("Sign out")')
    assert page.is_visible("#token")
    page.context.add_cookies([session])
    page.goto(f"{base}/keys")
    assert page.is_visible("#token")
    events = json.loads(cli(admin, "audit", "--user", user, "--json"))
    assert {"key_added", "key_removed"} <= {e["event"] for e in events if e["actor"] == user}


def test_forms_need_the_session_and_its_csrf_token(
    server: ServerThread, admin: Admin, page: Any, tmp_path: Path
) -> None:
    user = unique("csrf")
    cli(admin, "user", "add", user)
    token = personal_token(admin, user)
    base = http_base(server)
    page.goto(f"{base}/keys")
    page.fill("#token", token)
    page.click('button:has-text("Sign in")')
    cookie = next(c for c in page.context.cookies() if c["name"] == "gw_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/keys"
    # A post without the page's CSRF token (as a forged cross-site form would be) is refused.
    pub = Path(f"{keygen(tmp_path / 'k')}.pub").read_text()
    reply = page.request.post(f"{base}/keys", form={"name": "x", "key": pub, "csrf": "forged"})
    assert reply.status == 403
    assert json.loads(cli(admin, "key", "list", user, "--json")) == []
    headers = page.request.get(f"{base}/keys").headers
    assert "default-src 'none'" in headers["content-security-policy"]
    # An operator token cannot sign in to the page.
    page.context.clear_cookies()
    page.goto(f"{base}/keys")
    ops = json.loads(cli(admin, "token", "create", unique("opsweb"), "--json"))["token"]
    page.fill("#token", ops)
    page.click('button:has-text("Sign in")')
    assert "operator token" in page.text_content("#error")


def test_regression_cross_site_signin_in_chromium(
    server: ServerThread, admin: Admin, page: Any
) -> None:
    """Login CSRF from another port of the same host: the same site, so SameSite cookies
    flow, and cookies ignore ports, so that page can plant a sign-in cookie of its own
    (fetched from the gateway) next to a matching form. Only the origin check stops it."""
    attacker = unique("atk")
    cli(admin, "user", "add", attacker)
    token = personal_token(admin, attacker)
    base = http_base(server)
    with urllib.request.urlopen(f"{base}/keys", timeout=30) as reply:
        planted = reply.headers["Set-Cookie"].split(";")[0]
        csrf = re.search(r'name="csrf" value="([^"]*)"', reply.read().decode()).group(1)  # type: ignore[union-attr]
    form = (
        f'<form method="post" action="{base}/keys/signin">'
        f'<input type="hidden" name="token" value="{token}">'
        f'<input type="hidden" name="csrf" value="{csrf}">'
        "<button>Continue</button></form>"
    ).encode()

    class Evil(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Set-Cookie", f"{planted}; Path=/keys")
            self.send_header("Content-Length", str(len(form)))
            self.end_headers()
            self.wfile.write(form)

        def log_message(self, *args: object) -> None:
            pass

    evil = ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        assert any(c["name"] == "gw_signin" for c in page.context.cookies())  # planted
        page.click("button")
        assert page.text_content("#error") == "Cross-site request refused."
        assert not [c for c in page.context.cookies() if c["name"] == "gw_session"]
    finally:
        evil.shutdown()
        evil.server_close()


def test_regression_a_pasted_private_key_is_cleared_in_the_browser(
    server: ServerThread, admin: Admin, page: Any, tmp_path: Path
) -> None:
    """Pasted by mistake, a private key is refused and the field comes back empty: the page
    never holds it again (it has no script that could, either)."""
    user = unique("priv")
    cli(admin, "user", "add", user)
    token = personal_token(admin, user)
    page.goto(f"{http_base(server)}/keys")
    page.fill("#token", token)
    page.click('button:has-text("Sign in")')
    private = keygen(tmp_path / "id_ed25519").read_text()
    page.fill("#name", "laptop")
    page.fill("#key", private)
    page.click('button:has-text("Add key")')
    assert page.text_content("#error") == (
        "this is a PRIVATE key: never share it; give the public key (the .pub file) instead"
    )
    assert page.input_value("#key") == "" and page.input_value("#name") == "laptop"
    assert private.splitlines()[1] not in page.content()
    assert page.locator("script").count() == 0
    assert json.loads(cli(admin, "key", "list", user, "--json")) == []
