"""Roles per app and per command; unknown, forbidden and malformed paths all look alike."""

from __future__ import annotations

import os

import pytest

from tests.helpers import fsck, server_refs, unique


def denied(name: str) -> str:
    return f"error: repository '{name}' not found or access denied\n"


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
    # The reader knows the app exists (it just cloned it): told what is missing.
    assert (
        f"error: you have read access to '{app}': pushing needs the write role; "
        "ask its owner or an admin\n"
    ) in push.stderr
    assert server_refs(server.repo(app)) == before
    # Someone who cannot read it still gets the words of a missing app.
    stranger = make_user("stranger")
    for name in (app, "no-such-app"):
        push = stranger.git("push", stranger.url(name), "main", cwd=copy, check=False)
        assert push.returncode != 0 and denied(name) in push.stderr
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


def test_push_size_limit(gateway_factory, make_user, tmp_path):
    small = gateway_factory(name="small", git={"max_input_size": "20K"})
    client = small.user("big", tmp_path)
    app = small.app(client, "bigapp")
    work = client.new_repo(tmp_path / "bigwork", {"blob": os.urandom(60000).hex()})
    result = client.git("push", client.url(app), "main", cwd=work, check=False)
    assert result.returncode != 0
    assert "maximum allowed size" in result.stderr
    # git's own words do not say what the limit is: the gateway does.
    assert (
        "error: push refused: the pack is larger than this gateway's limit of 20 KiB per "
        "push ([git] max_input_size)\n"
    ) in result.stderr
    assert server_refs(small.repo(app)) == {}
    fsck(small.repo(app))
    # A push within the limit says nothing of it.
    work = client.new_repo(tmp_path / "smallwork", {"blob": "small\n"})
    result = client.git("push", client.url(app), "main", cwd=work)
    assert "max_input_size" not in result.stderr


def test_a_moved_key_logs_in_as_its_new_owner(admin, make_user, server, tmp_path):
    """`key move` gives a key registered on the wrong account to the right one: from then
    on it authenticates as the new owner, and the old account has no key left."""
    wrong = make_user("wrong")
    right_name = unique("right")
    admin.ok("user", "add", right_name)
    out = admin.ok("key", "move", wrong.name, "laptop", "--to", right_name, "--name", "desk")
    assert f"from {wrong.name} to {right_name} as 'desk'" in out
    assert wrong.ssh().stdout.startswith(f"Hi {right_name}!")
    assert admin.ok("key", "list", wrong.name, "--json").strip() == "[]"
    code, _, err = admin("key", "move", right_name, "desk", "--to", "no-such-user")
    assert code == 1 and "no such user 'no-such-user'" in err
    assert '"desk"' in admin.ok("key", "list", right_name, "--json")  # still there
