"""SSH sessions with the real OpenSSH client: who gets in, and everything that is refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import textwrap
from pathlib import Path

import asyncssh
import pytest

from tests.helpers import Client, keygen, keygen_fingerprint, run, server_refs


def test_welcome_names_user_key_and_apps(owner, app, admin, make_user):
    result = owner.ssh()
    assert result.returncode == 0, result.stderr
    fingerprint = keygen_fingerprint(Path(f"{owner.key}.pub"))
    first = result.stdout.splitlines()[0]
    assert first == f'Hi {owner.name}! You are authenticated with key "laptop" ({fingerprint}).'
    assert f"  {app}  owner  ssh://git@127.0.0.1:{owner.server.port}/{app}.git" in result.stdout
    reader = make_user("reader")
    admin.ok("app", "grant", app, reader.name, "read")
    out = reader.ssh().stdout
    assert f"Hi {reader.name}!" in out and f"  {app}  read" in out
    stranger = make_user("stranger")
    out = stranger.ssh().stdout
    assert app not in out and "cannot reach any app" in out


def test_last_used_is_recorded(owner, admin):
    before = json.loads(admin.ok("key", "list", owner.name, "--json"))[0]
    assert before["last_used_at"] is None
    assert owner.ssh().returncode == 0
    after = json.loads(admin.ok("key", "list", owner.name, "--json"))[0]
    assert after["last_used_at"] is not None


def test_unknown_key_gets_permission_denied(server, tmp_path):
    key = keygen(tmp_path / "unregistered")
    stranger = Client(tmp_path / "home", key, server)
    result = stranger.ssh()
    assert result.returncode == 255
    assert result.stderr.strip().endswith("Permission denied (publickey).")
    assert result.stdout == ""


def test_ssh_user_must_be_git(owner):
    result = run([*owner.ssh_base, "-T", "root@127.0.0.1"], env=owner.env)
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_password_and_keyboard_interactive_are_not_offered(owner):
    result = owner.ssh(
        options=(
            "-T",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        )
    )
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


async def test_password_auth_refused_by_the_server(server):
    with pytest.raises(asyncssh.PermissionDenied):
        async with asyncssh.connect(
            "127.0.0.1",
            server.port,
            username="git",
            password="anything",
            known_hosts=None,
            client_keys=None,
            agent_path=None,
            preferred_auth="password,keyboard-interactive",
        ):
            pass


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


def test_pty_refused(owner):
    result = owner.ssh(options=("-tt",))
    assert result.returncode != 0
    assert "PTY allocation request failed" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("sh", "-c", "id"),
        ("bash",),
        ("ls", "/"),
        ("git-shell",),
        ("scp", "-t", "/tmp"),
        ("id;", "ls"),
    ],
)
def test_shell_commands_refused(owner, command):
    result = owner.ssh(*command)
    assert result.returncode == 128
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown command")


def test_sftp_and_subsystems_refused(owner, server):
    result = run(
        [
            "sftp",
            "-b",
            "-",
            "-P",
            str(server.port),
            *[a for a in owner.ssh_base[1:] if a != "-p" and a != str(server.port)],
            "git@127.0.0.1",
        ],
        env=owner.env,
        input="ls\n",
    )
    assert result.returncode != 0
    assert "subsystem request failed" in result.stderr
    result = owner.ssh("anything", options=("-T", "-s"))
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "error: subsystem 'anything' is not supported: no sftp or scp"
    ]


def test_port_forwarding_refused(owner):
    result = owner.ssh(options=("-T", "-W", "127.0.0.1:22"))
    assert result.returncode == 255 and "open failed" in result.stderr
    result = owner.ssh(
        "info", options=("-T", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22")
    )
    assert result.returncode == 255 and "remote port forwarding failed" in result.stderr


def test_x11_forwarding_refused(owner):
    result = run(
        [*owner.ssh_base, "-T", "-X", "git@127.0.0.1"], env={**owner.env, "DISPLAY": ":99"}
    )
    assert "X11 forwarding request failed" in result.stderr


async def test_agent_forwarding_refused(server, owner):
    # OpenSSH sends this request without asking for a reply, so ask for one explicitly.
    key = asyncssh.read_private_key(owner.key)
    async with asyncssh.connect(
        "127.0.0.1",
        server.port,
        username="git",
        client_keys=[key],
        known_hosts=None,
        agent_path=None,
    ) as conn:
        chan, _ = await conn.create_session(asyncssh.SSHClientSession)
        granted = await chan._make_request(b"auth-agent-req@openssh.com")
        assert granted is False
        chan.close()


def test_env_requests_never_reach_git_or_hooks(owner, app, server, tmp_path):
    dump = tmp_path / "hook-env.json"
    hook = server.repo(app) / "hooks" / "post-receive"
    hook.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import json, os
            with open({str(dump)!r}, "w") as out:
                json.dump(dict(os.environ), out)
            """
        )
    )
    hook.chmod(0o755)
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
    key = asyncssh.read_private_key(owner.key)
    async with asyncssh.connect(
        "127.0.0.1",
        server.port,
        username="git",
        client_keys=[key],
        known_hosts=None,
        agent_path=None,
    ) as conn:
        for command in ("git-upload-pack 'a\x00b.git'", "git-upload-pack '" + "a" * 10000 + "'"):
            result = await asyncio.wait_for(conn.run(command), 30)
            assert result.exit_status != 0
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
