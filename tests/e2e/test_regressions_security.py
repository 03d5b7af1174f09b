"""Security regressions: each test is an attack that must keep failing (see the vulnerability
classes in ../shared/design/anchors.md §6: key confusion, env injection, traversal...)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import textwrap

import asyncssh
import pytest
from asyncssh.packet import String

from tests.helpers import (
    DEPLOY_PYTHON,
    Admin,
    Client,
    ServeProcess,
    keygen,
    run,
    server_refs,
    ssh_connect,
    unique,
    write_config,
)


def denied(name: str) -> str:
    return f"error: repository '{name}' not found or access denied\n"


async def test_registered_key_with_a_forged_signature_is_refused(server, owner):
    """Presenting a victim's registered public key, signed with another private key."""
    victim = owner
    forged = asyncssh.load_keypairs([asyncssh.generate_private_key("ssh-ed25519")])[0]
    forged.public_data = asyncssh.read_public_key(f"{victim.key}.pub").public_data
    with pytest.raises(asyncssh.PermissionDenied):
        async with ssh_connect(server.port, forged, preferred_auth="publickey"):
            pass


def test_read_only_member_cannot_push(owner, app, admin, make_user, server, tmp_path):
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    reader = make_user("reader")
    admin.ok("app", "grant", app, reader.name, "read")
    before = server_refs(server.repo(app))
    result = reader.ssh(f"git-receive-pack '{app}.git'", input="0000")
    assert result.returncode == 1 and result.stderr == (
        f"error: you have read access to '{app}': pushing needs the write role; "
        "ask its owner or an admin\n"
    )
    assert server_refs(server.repo(app)) == before


@pytest.mark.parametrize(
    "command",
    [
        "git-upload-pack",
        "git-upload-pack ''",
        "git-upload-pack '.git'",
        'git-upload-pack "$HOME/x.git"',
        "git-upload-pack 'a.git' --upload-pack=touch /tmp/pwned",
        "git-upload-pack --help",
        "git upload-pack --strict /etc",
        "\x7fELF\x02\x01\x01",
        "git-upload-pack '" + "../" * 300 + "etc'",
    ],
)
def test_malformed_command_lines(owner, command):
    result = owner.ssh(command, input="0000")
    assert result.returncode in (1, 128)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")


def test_identity_comes_from_the_key_that_signed(owner, make_user, tmp_path):
    """Offering someone else's public key without its private half must not make you them."""
    victim = make_user("victim")
    only_public = tmp_path / "stolen"
    only_public.mkdir()
    shutil.copy(f"{victim.key}.pub", only_public / "victim.pub")
    options = ("-T", "-o", "IdentitiesOnly=yes", "-i", str(only_public / "victim.pub"))
    result = run(
        [*owner.ssh_base[:3], *owner.ssh_base[5:], *options, "-i", str(owner.key), "git@127.0.0.1"],
        env=owner.env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Hi {owner.name}!")


def test_env_requests_never_reach_git_or_hooks(owner, app, server, tmp_path, monkeypatch):
    dump = tmp_path / "hook-env.json"
    # A hook written into the repository never runs (test_regressions_planting), so the
    # gateway itself is told to install this post-receive, which dumps its environment.
    script = f"#!{sys.executable}\n" + textwrap.dedent(
        f"""
        import json, os
        with open({str(dump)!r}, "w") as out:
            json.dump(dict(os.environ), out)
        """
    )
    monkeypatch.setitem(server.gateway.repos.hooks, "post-receive", script.encode())
    env_options = [
        "-o",
        "SetEnv=LANG=fr_FR.UTF-8 LC_ALL=fr_FR.UTF-8 LD_PRELOAD=/tmp/evil.so "
        "GIT_DIR=/tmp/evil FOO=bar GIT_PROTOCOL=version=1",
    ]
    owner.env["GIT_SSH_COMMAND"] += " " + " ".join([env_options[0], f"'{env_options[1]}'"])
    # The session goes on: the welcome still answers, and a push works.
    assert owner.ssh(options=("-T", *env_options)).returncode == 0
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    seen = json.loads(dump.read_text())
    assert "LD_PRELOAD" not in seen and "FOO" not in seen
    assert seen.get("GIT_DIR") != "/tmp/evil"
    assert seen.get("LANG") == "C"
    # git pushes with protocol v0/v1 (there is no v2 push), so the value set here arrives.
    assert seen.get("GIT_PROTOCOL") == "version=1"
    assert "refs/heads/main" in server_refs(server.repo(app))


async def test_nul_and_huge_commands_refused(server, owner):
    async with ssh_connect(server.port, owner.key) as conn:
        for command in ("git-upload-pack 'a\x00b.git'", "git-upload-pack '" + "a" * 10000 + "'"):
            result = await asyncio.wait_for(conn.run(command), 30)
            assert result.exit_status != 0
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")


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


async def test_env_requests_are_declined_at_the_ssh_layer(server, owner, app):
    async with ssh_connect(server.port, owner.key) as conn:
        chan = await held_channel(conn, app)
        request = chan._make_request  # asks for a reply, which OpenSSH clients never do
        assert await request(b"env", String(b"LD_PRELOAD"), String(b"/tmp/x.so")) is False
        assert await request(b"env", String(b"GIT_DIR"), String(b"/etc")) is False
        assert await request(b"env", String(b"GIT_PROTOCOL"), String(b"version=2")) is True
        assert await request(b"env", String(b"GIT_PROTOCOL"), String(b"v" * 1000)) is False
        assert chan._send_chan is not None  # declining never closed the session
        chan.close()


async def held_channel(conn: asyncssh.SSHClientConnection, app: str) -> asyncssh.SSHClientChannel:
    """A session kept open by the server (upload-pack waits for our wants), so that channel
    requests sent afterwards are answered by the gateway's policy, not by a closed channel."""
    chan, _ = await conn.create_session(
        asyncssh.SSHClientSession, f"git-upload-pack '{app}.git'", encoding=None
    )
    return chan


def test_regression_gateway_files_are_private_under_a_loose_umask(tmp_path):
    """Started with umask 000 (no systemd UMask=), the gateway still creates its registry,
    WAL files, repositories, deploy logs and control socket for its own user only."""
    config = write_config(
        tmp_path / "gw", deploy={"command": [DEPLOY_PYTHON, "-c", "print('deployed')"]}
    )
    gateway = ServeProcess(config, umask=0)
    try:
        admin = Admin(config)
        name, app = unique("private"), unique("privateapp")
        key = keygen(tmp_path / "id")
        admin.ok("user", "add", name)
        admin.ok("key", "add", name, "k", f"{key}.pub")
        admin.ok("app", "create", app, "--owner", name)
        client = Client(tmp_path / "home", key, gateway, name=name)
        work = client.new_repo(tmp_path / "work")
        pushed = client.git("push", client.url(app), "main", cwd=work)
        assert "deployed" in pushed.stderr
        storage, deploy = gateway.config.storage, gateway.config.deploy
        database = storage.database
        paths = [
            database,
            database.with_name(database.name + "-wal"),
            database.with_name(database.name + "-shm"),
            storage.control_socket,
            storage.repos,
            storage.repos / f"{app}.git",
            *(storage.repos / f"{app}.git" / "objects").rglob("*"),
            *(storage.repos / f"{app}.git" / "refs").rglob("*"),
        ]
        assert not deploy.log_dir.exists()  # deploy logs live in the registry
        loose = {str(p): oct(p.stat().st_mode & 0o777) for p in paths if p.stat().st_mode & 0o077}
        assert loose == {}
    finally:
        assert gateway.stop() == 0
