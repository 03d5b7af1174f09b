"""Roles per app and per command; unknown, forbidden and malformed paths all look alike."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ServerThread, fsck, server_refs, unique, write_config


def denied(name: str) -> str:
    return f"error: repository '{name}' not found or access denied\n"


def test_missing_and_forbidden_apps_get_the_same_message(owner, app, make_user):
    stranger = make_user("stranger")
    forbidden = stranger.ssh(f"git-upload-pack '{app}.git'", input="0000")
    missing = stranger.ssh("git-upload-pack 'no-such-app.git'", input="0000")
    assert forbidden.returncode == missing.returncode == 1
    assert forbidden.stderr == denied(app)
    assert missing.stderr == denied("no-such-app")
    assert forbidden.stdout == missing.stdout == ""
    clone = stranger.git("clone", stranger.url(app), "x", check=False)
    assert (
        clone.returncode != 0 and f"repository '{app}' not found or access denied" in clone.stderr
    )


def test_read_member_can_clone_but_not_push(owner, app, admin, make_user, server, tmp_path):
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    reader = make_user("reader")
    admin.ok("app", "grant", app, reader.name, "read")
    copy = tmp_path / "copy"
    reader.git("clone", "-q", reader.url(app), str(copy))
    before = server_refs(server.repo(app))
    reader.commit(copy, {"x": "1\n"}, "reader change")
    push = reader.git("push", reader.url(app), "main", cwd=copy, check=False)
    assert push.returncode != 0
    assert denied(app).strip() in push.stderr
    assert server_refs(server.repo(app)) == before
    # Granting again changes the role, effective on the next connection.
    admin.ok("app", "grant", app, reader.name, "write")
    reader.git("push", "-q", reader.url(app), "main", cwd=copy)
    assert server_refs(server.repo(app)) != before
    fsck(server.repo(app))


@pytest.mark.parametrize("role", ["write", "admin"])
def test_writers_and_admins_can_push(owner, app, admin, make_user, server, tmp_path, role):
    member = make_user(role)
    admin.ok("app", "grant", app, member.name, role)
    work = member.new_repo(tmp_path / "work")
    member.git("push", "-q", member.url(app), "main", cwd=work)
    assert "refs/heads/main" in server_refs(server.repo(app))
    fsck(server.repo(app))


def test_revoked_member_loses_access(owner, app, admin, make_user):
    member = make_user("member")
    admin.ok("app", "grant", app, member.name, "write")
    assert member.ssh(f"git-upload-pack '{app}.git'", input="0000").returncode == 0
    admin.ok("app", "revoke", app, member.name)
    result = member.ssh(f"git-upload-pack '{app}.git'", input="0000")
    assert result.returncode == 1 and result.stderr == denied(app)


def test_removed_key_and_removed_user_cannot_log_in(admin, make_user):
    user = make_user("leaving")
    assert user.ssh().returncode == 0
    admin.ok("key", "remove", user.name, "laptop")
    result = user.ssh()
    assert result.returncode == 255 and "Permission denied (publickey)" in result.stderr
    other = make_user("gone")
    admin.ok("user", "remove", other.name)
    assert "Permission denied (publickey)" in other.ssh().stderr


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("../x", "../x"),
        ("../../../../etc/passwd", "../../../../etc/passwd"),
        ("/etc/passwd", "/etc/passwd"),
        ("x;id", "x;id"),
        ("$(id)", "$(id)"),
        ("`id`", "`id`"),
        ("x' 'y", "x' 'y"),
        ('x"y', 'x"y'),
        ("app/../../etc", "app/../../etc"),
        ("~root/.ssh", "~root/.ssh"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
    ],
)
def test_traversal_and_injection_in_path(owner, server, path, shown, tmp_path):
    quoted = "'" + path.replace("'", "'\\''") + "'"
    before = sorted(os.listdir(server.repos))
    for command in ("git-upload-pack", "git-receive-pack", "git-upload-archive"):
        result = owner.ssh(f"{command} {quoted}", input="0000")
        assert result.returncode == 1, result
        assert result.stderr == denied(shown)
        assert result.stdout == ""
    assert sorted(os.listdir(server.repos)) == before


def test_traversal_through_git_itself(owner, tmp_path):
    result = owner.git(
        "clone", f"git@127.0.0.1:../{owner.name}.git", str(tmp_path / "x"), check=False
    )
    assert result.returncode != 0 and "not found or access denied" in result.stderr


def test_push_size_limit(tmp_path_factory, make_user, tmp_path):
    directory = tmp_path_factory.mktemp("small")
    small = ServerThread(write_config(directory, git={"max_input_size": "20K"})).start()
    try:
        from tests.helpers import Admin, Client, keygen

        admin = Admin(small.config_path)
        name, app = unique("big"), unique("bigapp")
        key = keygen(tmp_path / "big_id")
        admin.ok("user", "add", name)
        admin.ok("key", "add", name, "k", f"{key}.pub")
        admin.ok("app", "create", app, "--owner", name)
        client = Client(tmp_path / "bighome", key, small, name=name)
        work = client.new_repo(tmp_path / "bigwork", {"blob": os.urandom(60000).hex()})
        result = client.git("push", client.url(app), "main", cwd=work, check=False)
        assert result.returncode != 0
        assert "maximum allowed size" in result.stderr
        assert server_refs(small.repo(app)) == {}
        fsck(small.repo(app))
    finally:
        small.stop()
