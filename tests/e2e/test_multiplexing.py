"""OpenSSH connection multiplexing (ControlMaster): one authenticated connection runs many
sessions, so a removed key, a removed user or a revoked role must stop working for the next
session on it, not only for the next connection."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Client, LiveProcess

REVOKED = "error: access denied: this SSH key is no longer registered"


@contextlib.contextmanager
def control_master(client: Client, socket: Path) -> Iterator[Client]:
    """A running `ssh -M` master for the client, and a copy of the client whose ssh (and so
    git) runs every command as a session over it; the master is always killed."""
    master = LiveProcess(
        [*client.ssh_base, "-v", "-M", "-S", str(socket), "-N", "git@127.0.0.1"], env=client.env
    )
    try:
        master.wait_for(r"Entering interactive session")
        mux = Client(client.home, client.key, client.server, name=client.name)
        mux.ssh_base = [*client.ssh_base, "-S", str(socket), "-o", "ControlMaster=no"]
        mux.env = {**client.env, "GIT_SSH_COMMAND": " ".join(mux.ssh_base)}
        yield mux
    finally:
        master.kill()


def audit_of(admin, user: str) -> list[dict[str, object]]:
    return json.loads(admin.ok("audit", "--json", "--limit", "1000", "--user", user))


def logins(admin, user: str) -> int:
    return sum(1 for e in audit_of(admin, user) if e["event"] == "auth_ok")


@pytest.mark.parametrize("removal", ["key", "user"])
def test_regression_removed_key_or_user_stops_working_on_an_open_connection(
    removal, admin, make_user, tmp_path
):
    user = make_user("muxed")
    app_name = f"{user.name}-app"
    with control_master(user, tmp_path / "ctl") as mux:
        assert mux.ssh().returncode == 0  # a session over the master
        if removal == "key":
            admin.ok("key", "remove", user.name, "laptop")
        else:
            admin.ok("user", "remove", user.name)
        result = mux.ssh()
        assert result.returncode == 1
        assert result.stderr == REVOKED + "\n"
        listed = mux.git("ls-remote", mux.url(app_name), check=False)
        assert listed.returncode != 0 and REVOKED in listed.stderr
    # Everything went over the one connection the master opened.
    assert logins(admin, user.name) == 1
    denied = [e for e in audit_of(admin, user.name) if e["event"] == "access_denied"]
    assert len(denied) == 2
    assert all(e["detail"]["reason"] == "key no longer registered" for e in denied)
    assert {e["detail"]["command"] for e in denied} == {"", f"git-upload-pack '/{app_name}.git'"}
    # And a new connection with that key is refused at login, as before.
    assert user.ssh().returncode == 255


def test_regression_revoked_role_stops_working_on_an_open_connection(
    owner, app, admin, make_user, tmp_path
):
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    member = make_user("member")
    admin.ok("app", "grant", app, member.name, "write")
    with control_master(member, tmp_path / "ctl") as mux:
        mux.git("clone", "-q", mux.url(app), str(tmp_path / "clone"))
        mux.commit(tmp_path / "clone", {"f": "1\n"}, "by the member")
        mux.git("push", "-q", "origin", "main", cwd=tmp_path / "clone")
        admin.ok("app", "grant", app, member.name, "read")  # write -> read
        mux.commit(tmp_path / "clone", {"f": "2\n"}, "after the downgrade")
        pushed = mux.git("push", "-q", "origin", "main", cwd=tmp_path / "clone", check=False)
        assert pushed.returncode != 0
        assert f"you have read access to '{app}': pushing needs the write role" in pushed.stderr
        assert mux.git("ls-remote", mux.url(app), check=False).returncode == 0  # read still
        admin.ok("app", "revoke", app, member.name)
        listed = mux.git("ls-remote", mux.url(app), check=False)
        assert listed.returncode != 0
        assert f"repository '{app}' not found or access denied" in listed.stderr
    assert logins(admin, member.name) == 1
    denied = [e for e in audit_of(admin, member.name) if e["event"] == "access_denied"]
    assert [e["app"] for e in denied] == [app, app]
