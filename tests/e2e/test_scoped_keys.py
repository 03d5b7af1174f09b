"""Scoped keys with real git and OpenSSH: deploy keys of one app (read-only or read-write) and
user keys limited to some apps or to reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    Admin,
    Client,
    keygen,
    server_refs,
    unique,
)


@pytest.fixture(scope="module")
def gw(module_gateways):
    return module_gateways(name="scoped")


@pytest.fixture
def owner(gw, tmp_path) -> Client:
    return gw.user("owner", tmp_path)


def app_with_commit(admin: Admin, owner: Client, tmp_path: Path) -> tuple[str, Path]:
    app = unique("web")
    admin.ok("app", "create", app, "--owner", owner.name)
    work = owner.new_repo(tmp_path / f"work-{app}")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    return app, work


def denied(app: str, why: str = "") -> str:
    return f"repository '{app}' not found or access denied{why}"


def test_a_read_only_deploy_key_clones_its_app_only(gw, admin, owner, tmp_path):
    app, _ = app_with_commit(admin, owner, tmp_path)
    other, _ = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "ci")
    out = admin.ok("app", "key", "add", app, "ci", f"{key}.pub")
    assert f"added deploy key 'ci' to app {app}: " in out and f"reaches {app} (read-only)" in out
    ci = Client(tmp_path / "home-ci", key, gw)
    welcome = ci.ssh().stdout
    assert f'Hi! You are authenticated with the deploy key "ci" of {app}' in welcome
    assert f"read-only: it reaches {ci.url(app)} only." in welcome
    ci.git("clone", "-q", ci.url(app), str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "README").exists()
    assert ci.ssh("deploys", app).returncode == 0
    # Its own app, pushing: told it is read-only. Another app, or none: the same words.
    ci.commit(tmp_path / "clone", {"x": "1\n"}, "from ci")
    pushed = ci.git("push", ci.url(app), "main", cwd=tmp_path / "clone", check=False)
    assert pushed.returncode != 0
    assert f'the deploy key "ci" of {app} is read-only: it cannot push' in pushed.stderr
    why = f": this is a deploy key of {app}, it reaches only that app"
    for target in (other, "no-such-app"):
        result = ci.git("ls-remote", ci.url(target), check=False)
        assert f"error: {denied(target, why)}" in result.stderr
    # Listed with the app, not with any user.
    [record] = json.loads(admin.ok("app", "key", "list", app, "--json"))
    assert (record["access"], record["user_name"], record["app_name"]) == ("read", None, app)
    assert "ci" not in admin.ok("key", "list", owner.name)


def test_a_write_deploy_key_pushes_and_deploys_as_itself(gw, admin, owner, tmp_path):
    app, work = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "bot")
    admin.ok("app", "key", "add", app, "bot", f"{key}.pub", "--write")
    bot = Client(tmp_path / "home-bot", key, gw)
    head = bot.commit(work, {"bot.txt": "1\n"}, "by the bot")
    bot.git("push", "-q", bot.url(app), "main", cwd=work)
    assert server_refs(gw.repo(app))["refs/heads/main"] == head
    audit = json.loads(admin.ok("audit", "--app", app, "--json"))
    pushes = [e for e in audit if e["event"] == "push"]
    assert pushes[0]["actor"] == f"deploy:{app}/bot"
    # It manages no keys.
    refused = bot.ssh("keys")
    assert (
        refused.stderr
        == f"error: this is a deploy key of {app}: it manages no keys (log in with your own key)\n"
    )
    assert bot.ssh("whoami").stdout.startswith(f"deploy key of {app} (read-write)\nkey: bot ")


def test_regression_one_key_one_owner_across_users_and_apps(gw, admin, owner, tmp_path):
    app, _ = app_with_commit(admin, owner, tmp_path)
    other_app, _ = app_with_commit(admin, owner, tmp_path)
    # A user's key cannot become a deploy key...
    code, _, err = admin("app", "key", "add", app, "laptop", f"{owner.key}.pub")
    assert code != 0 and err == "error: this SSH key is already used by another account\n"
    # ...a deploy key cannot become a user's key, nor another app's deploy key.
    key = keygen(tmp_path / "ci")
    admin.ok("app", "key", "add", app, "ci", f"{key}.pub")
    code, _, err = admin("key", "add", owner.name, "ci", f"{key}.pub")
    assert code != 0 and "already used by another account" in err
    code, _, err = admin("app", "key", "add", other_app, "ci", f"{key}.pub")
    assert code != 0 and "already used by another account" in err
    code, _, err = admin("app", "key", "add", app, "again", f"{key}.pub")
    assert code != 0 and f"already a deploy key of app '{app}' under the name 'ci'" in err


def test_regression_a_deploy_key_goes_with_its_app(gw, admin, owner, tmp_path):
    app, _ = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "ci")
    admin.ok("app", "key", "add", app, "ci", f"{key}.pub", "--write")
    ci = Client(tmp_path / "home-ci", key, gw)
    assert ci.ssh("whoami").returncode == 0
    admin.ok("app", "remove", app)
    assert ci.ssh("whoami").returncode == 255  # the key is gone with the app
    # An app created again under the name does not bring it back.
    admin.ok("app", "create", app, "--owner", owner.name)
    assert ci.ssh("whoami").returncode == 255


def test_a_user_key_limited_to_one_app_and_to_reading(gw, admin, owner, tmp_path):
    app, work = app_with_commit(admin, owner, tmp_path)
    other, _ = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "laptop-ro")
    out = admin.ok("key", "add", owner.name, "ro", f"{key}.pub", "--app", app, "--read-only")
    assert f"reaches {app} (read-only)" in out
    ro = Client(tmp_path / "home-ro", key, gw, name=owner.name)
    welcome = ro.ssh().stdout
    assert f"This key is limited to: {app}, reading only." in welcome
    assert other not in welcome
    assert ro.git("ls-remote", ro.url(app)).returncode == 0
    # The user owns the other app, but this key does not reach it: the usual words.
    result = ro.git("ls-remote", ro.url(other), check=False)
    assert f"error: {denied(other)}\n" in result.stderr
    ro.commit(work, {"y": "1\n"}, "read-only key")
    pushed = ro.git("push", ro.url(app), "main", cwd=work, check=False)
    assert pushed.returncode != 0
    assert f'error: the SSH key "ro" of {owner.name} is read-only: it cannot push' in (
        pushed.stderr
    )
    # The user's other keys are unaffected.
    assert owner.git("ls-remote", owner.url(other)).returncode == 0


def test_regression_a_key_scope_names_only_apps_the_user_reaches(gw, admin, owner, tmp_path):
    """Limiting a key to an app is no way to learn which apps exist."""
    stranger = unique("stranger")
    admin.ok("user", "add", stranger)
    theirs, _ = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "k")
    errors = set()
    for target in (theirs, "no-such-app"):
        code, _, err = admin("key", "add", stranger, "k", f"{key}.pub", "--app", target)
        assert code != 0
        errors.add(err.replace(target, "APP"))
    assert errors == {f"error: app 'APP' not found or not reachable by {stranger}\n"}


def test_regression_a_scoped_key_whose_apps_are_gone_reaches_nothing(gw, admin, owner, tmp_path):
    app, _ = app_with_commit(admin, owner, tmp_path)
    other, _ = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "scoped")
    admin.ok("key", "add", owner.name, "scoped", f"{key}.pub", "--app", app)
    scoped = Client(tmp_path / "home-scoped", key, gw, name=owner.name)
    admin.ok("app", "remove", app)
    # Not "every app" now that its list is empty: nothing.
    assert scoped.git("ls-remote", scoped.url(other), check=False).returncode != 0
    admin.ok("app", "create", app, "--owner", owner.name)  # the name again: another app
    assert scoped.git("ls-remote", scoped.url(app), check=False).returncode != 0
    listing = admin.ok("key", "list", owner.name)
    assert "no app" in next(line for line in listing.splitlines() if line.startswith("scoped "))


def test_regression_a_limited_key_cannot_mint_an_unlimited_one(gw, admin, owner, tmp_path):
    """Review finding: a CI key limited to one app and to reading registered a fresh,
    unlimited key over SSH, pushed with it elsewhere, and removed the owner's own key."""
    app, _ = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "ci")
    admin.ok("key", "add", owner.name, "ci", f"{key}.pub", "--app", app, "--read-only")
    ci = Client(tmp_path / "home-ci", key, gw, name=owner.name)
    keygen(tmp_path / "evil")
    for args, stdin in [
        (("keys", "add", "evil"), (tmp_path / "evil.pub").read_text()),
        (("keys", "remove", "laptop"), ""),
    ]:
        result = ci.ssh(*args, input=stdin)
        assert result.returncode != 0
        assert result.stderr.startswith("error: this key is limited (to some apps or to reading)")
    assert ci.ssh("keys").returncode == 0  # listing is fine
    listing = admin.ok("key", "list", owner.name)
    assert "evil" not in listing and "laptop" in listing


def test_a_user_limits_a_key_of_their_own_over_ssh(gw, admin, owner, tmp_path):
    app, _ = app_with_commit(admin, owner, tmp_path)
    other, _ = app_with_commit(admin, owner, tmp_path)
    key = keygen(tmp_path / "ci")
    text = (tmp_path / "ci.pub").read_text()
    added = owner.ssh("keys", "add", "ci", "--read-only", "--app", app, input=text)
    assert added.returncode == 0, added.stderr
    assert f"reaches {app} (read-only)" in added.stdout
    ci = Client(tmp_path / "home-ci", key, gw, name=owner.name)
    assert ci.git("ls-remote", ci.url(app)).returncode == 0
    assert ci.git("ls-remote", ci.url(other), check=False).returncode != 0
    # Only apps the user reaches, with one message for a missing app and another tenant's.
    theirs = unique("theirs")
    admin.ok("user", "add", theirs)
    admin.ok("app", "create", f"{theirs}-app", "--owner", theirs)
    keygen(tmp_path / "second")
    answers = set()
    for target in (f"{theirs}-app", "no-such-app"):
        result = owner.ssh(
            "keys", "add", "k2", "--app", target, input=(tmp_path / "second.pub").read_text()
        )
        assert result.returncode != 0
        answers.add(result.stderr.replace(target, "APP"))
    assert answers == {f"error: app 'APP' not found or not reachable by {owner.name}\n"}
