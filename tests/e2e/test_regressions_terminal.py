"""Terminal injection: commit subjects, authors, deploy output and other tenant text reach
other people's terminals (`deploys`, `logs`, the operator CLI) shown escaped, never obeyed."""

from __future__ import annotations

import re

import pytest

from tests.helpers import DEPLOY_PYTHON, Admin, Client, keygen, unique

# Clipboard write (OSC 52), window title, clear screen + cursor home, a bidi override.
SUBJECT = "fix \x1b]52;c;cm0gLXJmIH4=\x07 \x1b[2J\x1b[H \u202eevil \x1b]0;title\x07"
AUTHOR = "Eve \x1b]0;pwned\x07x"
OUTPUT = (
    "step 1\r\n"
    "\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\\n"
    "\x1b[1A\x1b[2Kfake: deploy succeeded\n"
    "\x1bP+q544e\x1b\\\n"
    "\x9b31mC1\n"
    "\x1b[32mgreen\x1b[0m\n"
)
# What a terminal could act on: C0 except newline and tab, DEL, C1, bidi controls.
RAW = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def assert_inert(text: str) -> None:
    assert RAW.findall(text) == [], repr(text)


@pytest.fixture(scope="module")
def deploying(module_gateways):
    program = "import sys; sys.stdout.write(open('out', encoding='utf-8').read())"
    return module_gateways(name="terminal", deploy={"command": [DEPLOY_PYTHON, "-c", program]})


def test_regression_tenant_text_reaches_terminals_escaped(deploying, tmp_path):
    admin = Admin(deploying.config_path)
    name, app = unique("eve"), unique("termapp")
    key = keygen(tmp_path / "eve_id")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", name)
    eve = Client(tmp_path / "home", key, deploying, name=name)
    eve.env["GIT_AUTHOR_NAME"] = AUTHOR
    work = eve.new_repo(tmp_path / "work", {"out": OUTPUT}, message=SUBJECT)
    push = eve.git("push", "-q", eve.url(app), "main", cwd=work, check=False)
    assert push.returncode == 0, push.stderr
    deploy_id = admin.ok("deploy", "list", app).splitlines()[1].split()[0].lstrip("#")

    # The hostile text was stored as pushed (nothing is lost), and is shown escaped.
    shown = eve.ssh("deploys", app)
    assert shown.returncode == 0
    assert_inert(shown.stdout)
    assert "\\x1b]52;c;" in shown.stdout
    for command in (("logs", app), ("logs", app, deploy_id), ("logs", app, "--follow")):
        result = eve.ssh(*command)
        assert result.returncode == 0, result.stderr
        assert_inert(result.stdout)
        assert "\\x1b]8;;http://evil.example/" in result.stdout
        assert "\\x1b[1A\\x1b[2Kfake" in result.stdout
        assert "step 1\n" in result.stdout  # CRLF is an ordinary line end

    for args in (
        ("deploy", "list", app),
        ("deploy", "show", deploy_id),
        ("deploy", "logs", deploy_id),
        ("deploy", "logs", deploy_id, "--follow"),
    ):
        out = admin.ok(*args)
        assert_inert(out)
    show = admin.ok("deploy", "show", deploy_id)
    assert "\\u202eevil" in show and "Eve \\x1b]0;pwned" in show

    # A hostile repository path lands in the audit trail (access_denied): shown escaped.
    refused = eve.ssh("git-upload-pack '\x1b]0;owned\x07\u202e.git'")
    assert refused.returncode != 0
    assert_inert(refused.stderr)
    table = admin.ok("audit", "--user", name)
    assert "access_denied" in table
    assert_inert(table)
