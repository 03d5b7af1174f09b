"""SSH sessions with the real OpenSSH client: who gets in, and everything that is refused."""

from __future__ import annotations

import json
from pathlib import Path

import asyncssh
import pytest

from tests.e2e.test_regressions_security import held_channel
from tests.helpers import Client, keygen, keygen_fingerprint, run, ssh_connect


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
        async with ssh_connect(
            server.port, password="anything", preferred_auth="password,keyboard-interactive"
        ):
            pass


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


async def test_agent_forwarding_refused(server, owner, app):
    # OpenSSH sends this request without asking for a reply, so ask for one explicitly.
    async with ssh_connect(server.port, owner.key) as conn:
        chan = await held_channel(conn, app)
        granted = await chan._make_request(b"auth-agent-req@openssh.com")
        assert granted is False
        assert chan._send_chan is not None  # refused by policy, not by a closed channel
        chan.close()
