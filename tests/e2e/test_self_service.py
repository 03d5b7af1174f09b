"""Self-service over SSH with the real OpenSSH client: whoami, keys, keys add/remove, help."""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import (
    Client,
    keygen,
    keygen_fingerprint,
    unique,
)

MAX_KEYS = 4


KEYS_USAGE = (
    "usage: keys | keys add NAME [--expires WHEN] [--read-only] [--app APP]... < KEY.pub"
    " | keys remove NAME"
)


@pytest.fixture(scope="module")
def gw(module_gateways):
    return module_gateways(name="self-service", limits={"max_keys_per_user": MAX_KEYS})


@pytest.fixture
def dev(gw, tmp_path) -> Client:
    return gw.user("dev", tmp_path)


def with_key(client: Client, key) -> Client:
    """The same person at the same terminal, offering another key."""
    return dataclasses.replace(client, key=key, env={})


def test_whoami_names_the_account_and_the_key(dev):
    result = dev.ssh("whoami")
    assert result.returncode == 0
    fingerprint = keygen_fingerprint(dev.key.with_suffix(".pub"))
    assert result.stdout == f"user: {dev.name}\nkey: laptop ({fingerprint})\nexpires: never\n"


def test_keys_add_list_and_remove(dev, tmp_path, admin):
    second = keygen(tmp_path / "second", comment="dev@desktop")
    added = dev.ssh("keys", "add", "desktop", input=(tmp_path / "second.pub").read_text())
    assert added.returncode == 0, added.stderr
    fingerprint = keygen_fingerprint(tmp_path / "second.pub")
    assert added.stdout == f"added key 'desktop' to {dev.name}: 256 {fingerprint} (ED25519)\n"
    # Same line as the operator CLI gives.
    listing = dev.ssh("keys").stdout.splitlines()
    assert listing[0].split() == [
        "NAME",
        "TYPE",
        "BITS",
        "FINGERPRINT",
        "MD5",
        "CREATED",
        "LAST",
        "USED",
        "EXPIRES",
        "REACHES",
    ]
    assert listing[1].startswith("desktop ") and not listing[1].endswith("<- this connection")
    assert listing[2].startswith("laptop ") and listing[2].endswith("<- this connection")
    # The new key logs in, as the same account.
    desktop = with_key(dev, second)
    assert desktop.ssh("whoami").stdout.startswith(f"user: {dev.name}\nkey: desktop ")
    removed = desktop.ssh("keys", "remove", "laptop")
    laptop = keygen_fingerprint(dev.key.with_suffix(".pub"))
    assert removed.stdout == f"removed key 'laptop' ({laptop}) from {dev.name}\n"
    assert dev.ssh("whoami").returncode == 255  # laptop no longer logs in
    gone = desktop.ssh("keys", "remove", "desktop")
    assert "This was the key of this connection: it can no longer log in." in gone.stdout
    assert admin.ok("key", "list", dev.name).count("\n") == 1  # headers only
    audit = admin.ok("audit", "--user", dev.name)
    assert "key_added" in audit and "key_removed" in audit


def test_help_and_the_welcome_list_every_command(dev):
    text = dev.ssh("help").stdout
    lines = text.splitlines()
    for form in (
        "info",
        "whoami",
        "keys add NAME [--expires WHEN] [--read-only] [--app APP]... < KEY.pub",
        "keys remove NAME",
        "deploys APP",
        "logs APP [ID] [--follow]",
        "cancel ID",
        "help",
    ):
        assert f"  {form}" in lines, form
    # What a command does is wrapped under its forms.
    at = lines.index("  keys remove NAME")
    assert lines[at + 1] == "      list, add or remove the SSH keys of your account"
    assert lines[0].startswith("Commands (ssh -p ")
    assert max(len(line) for line in lines) <= 80, text
    welcome = dev.ssh().stdout.splitlines()
    start = welcome.index(lines[0])
    assert welcome[start : start + len(lines)] == lines and welcome[-1] == "There is no shell."
    assert max(len(line) for line in welcome[start:]) <= 80


def test_regression_keys_add_has_the_same_rules_and_messages(dev, gw, admin, tmp_path):
    other = unique("other")
    admin.ok("user", "add", other)
    theirs = keygen(tmp_path / "theirs")
    admin.ok("key", "add", other, "main", f"{theirs}.pub")
    cases = {
        # Another account's key: one key, one owner.
        (
            tmp_path / "theirs.pub"
        ).read_text(): "error: this SSH key is already used by another account",
        # Its own key again.
        dev.key.with_suffix(".pub").read_text(): (
            f"error: this SSH key is already registered on account '{dev.name}' "
            "under the name 'laptop'"
        ),
        # A private key pasted by mistake.
        (tmp_path / "theirs").read_text(): "error: ",
        "ssh-ed25519 AAAA\x1b[31mnot-base64": "error: ",
    }
    for text, message in cases.items():
        result = dev.ssh("keys", "add", "new", input=text)
        assert result.returncode != 0
        assert result.stderr.startswith(message), result.stderr
        assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr
        assert "Traceback" not in result.stderr
    assert admin.ok("key", "list", other).count("\n") == 2
    assert admin.ok("key", "list", dev.name).count("\n") == 2


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("keys", "add", "../x"), "KEY", "error: invalid key name"),
        (("keys", "add", "\x1b]0;x\x07"), "KEY", "error: invalid key name"),
        (("keys", "add", "big"), "x" * 100_000, "error: public key text is too long"),
        (("keys", "add", "empty"), "", "error: no public key on standard input"),
        (
            ("keys", "add"),
            "KEY",
            f"error: {KEYS_USAGE}",
        ),
        (
            ("keys", "rm", "laptop"),
            "",
            f"error: {KEYS_USAGE.rsplit(' | ', 1)[0]}",
        ),
        (("keys", "remove", "nosuch"), "", "error: "),
        (("whoami", "root"), "", "error: usage: whoami"),
    ],
)
def test_regression_bad_self_service_requests_change_nothing(
    dev, admin, tmp_path, args, stdin, message
):
    if stdin == "KEY":
        keygen(tmp_path / "k")
        stdin = (tmp_path / "k.pub").read_text()
    result = dev.ssh(*args, input=stdin)
    assert result.returncode != 0
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr
    assert admin.ok("key", "list", dev.name).count("\n") == 2  # laptop only


def test_regression_keys_never_reach_another_account(dev, admin, tmp_path):
    """`keys remove NAME` names a key of the caller's account only: another account's key of
    the same name is untouched."""
    other = unique("other")
    admin.ok("user", "add", other)
    theirs = keygen(tmp_path / "theirs")
    admin.ok("key", "add", other, "work", f"{theirs}.pub")
    result = dev.ssh("keys", "remove", "work")
    assert result.stderr == f"error: user '{dev.name}' has no key named 'work'\n"
    assert "work" in admin.ok("key", "list", other)


def test_regression_an_account_cannot_grow_the_registry_without_bound(dev, admin, tmp_path):
    for i in range(MAX_KEYS - 1):
        keygen(tmp_path / f"k{i}")
        dev.ssh("keys", "add", f"k{i}", input=(tmp_path / f"k{i}.pub").read_text())
    keygen(tmp_path / "one-too-many")
    result = dev.ssh("keys", "add", "extra", input=(tmp_path / "one-too-many.pub").read_text())
    assert result.returncode != 0
    assert result.stderr == (
        f"error: {dev.name} has {MAX_KEYS} keys, the most an account may have "
        "([limits] max_keys_per_user): remove one first\n"
    )
    # The same rule for the operator's CLI.
    code, _, err = admin("key", "add", dev.name, "extra", str(tmp_path / "one-too-many.pub"))
    assert code != 0 and "max_keys_per_user" in err
    assert admin.ok("key", "list", dev.name).count("\n") == MAX_KEYS + 1
