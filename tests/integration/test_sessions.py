"""Logins and commands over SSH against an in-process gateway (asyncssh on both ends)."""

from __future__ import annotations

import json

import asyncssh
import pytest
from asyncssh.public_key import SSHLocalKeyPair

from tests.integration.conftest import LiveGateway, Person


def forged(holder: asyncssh.SSHKey, victim: asyncssh.SSHKey) -> asyncssh.SSHKeyPair:
    """A key pair that offers `victim`'s public key but signs with `holder`'s private key:
    what someone holding only a copy of another user's public key can send."""
    pair = SSHLocalKeyPair(holder, None, None, None)
    pair.public_data = victim.public_data
    return pair


async def audit_events(gw: LiveGateway, event: str) -> list[dict[str, object]]:
    rows = json.loads(await gw.admin("audit", "--json", "--limit", "100"))
    return [row for row in rows if row["event"] == event]


# -- authentication --


async def test_a_registered_key_logs_in_and_info_names_the_user(gw: LiveGateway):
    alice = await gw.user("alice")
    app = await gw.app(alice)
    reply = await gw.run(alice, None)
    assert reply.code == 0, reply.stderr
    first = reply.stdout.splitlines()[0]
    assert first == (
        f'Hi {alice.name}! You are authenticated with key "laptop" ({alice.fingerprint}).'
    )
    assert f"  {app}  owner  ssh://git@127.0.0.1:{gw.port}/{app}.git" in reply.stdout


async def test_an_unknown_key_is_refused(gw: LiveGateway):
    await gw.user("alice")
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        async with gw.connect(stranger):
            pass


async def test_only_user_git_is_accepted(gw: LiveGateway):
    alice = await gw.user("alice")
    with pytest.raises(asyncssh.PermissionDenied):
        async with gw.connect(alice.key, username="root"):
            pass


async def test_password_and_keyboard_interactive_are_not_offered(gw: LiveGateway):
    with pytest.raises(asyncssh.PermissionDenied):
        async with gw.connect(password="secret", kbdint_auth=True, client_keys=None):
            pass


async def test_regression_a_public_key_offered_without_its_private_key_never_logs_in(
    gw: LiveGateway,
):
    """The victim's key is registered, so the unsigned probe is answered "go on"; the
    signature made with another key fails, and nothing of that attempt becomes the identity."""
    victim = await gw.user("victim")
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        async with gw.connect(forged(stranger, victim.key)):
            pass
    assert await audit_events(gw, "auth_ok") == []


async def test_regression_the_identity_is_the_key_that_signed_not_one_probed_before(
    gw: LiveGateway,
):
    victim = await gw.user("victim")
    mallory = await gw.user("mallory")
    async with gw.connect(forged(mallory.key, victim.key), mallory.key) as conn:
        result = await conn.run("whoami", encoding=None)
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == [f"user: {mallory.name}", f"key: laptop ({mallory.fingerprint})"]
    [ok] = await audit_events(gw, "auth_ok")
    assert ok["actor"] == mallory.name


async def test_a_read_only_deploy_key_reaches_its_app_only(gw: LiveGateway):
    owner = await gw.user("owner")
    app, other = await gw.app(owner), await gw.app(owner)
    ci = asyncssh.generate_private_key("ssh-ed25519")
    await gw.admin("app", "key", "add", app, "ci", str(gw.public_key_file(ci, "ci")))
    reply = await gw.run(ci, "whoami")
    assert reply.stdout.splitlines()[0] == f"deploy key of {app} (read-only)"
    assert (await gw.run(ci, f"git-upload-pack '{app}.git'", stdin="0000")).code == 0
    pushed = await gw.run(ci, f"git-receive-pack '{app}.git'", stdin="0000")
    assert pushed.code == 1
    assert pushed.stderr.startswith(f'error: the deploy key "ci" of {app} is read-only: it cannot')
    elsewhere = await gw.run(ci, f"git-upload-pack '{other}.git'")
    assert elsewhere.stderr == (
        f"error: repository '{other}' not found or access denied: "
        f"this is a deploy key of {app}, it reaches only that app\n"
    )


async def test_regression_a_key_scoped_to_one_app_cannot_reach_the_users_other_apps(
    gw: LiveGateway,
):
    owner = await gw.user("owner")
    app, other = await gw.app(owner), await gw.app(owner)
    scoped = asyncssh.generate_private_key("ssh-ed25519")
    pub = gw.public_key_file(scoped, "scoped")
    await gw.admin("key", "add", owner.name, "ci", str(pub), "--app", app, "--read-only")
    assert (await gw.run(scoped, f"git-upload-pack '{app}.git'", stdin="0000")).code == 0
    elsewhere = await gw.run(scoped, f"git-upload-pack '{other}.git'")
    assert elsewhere.stderr == f"error: repository '{other}' not found or access denied\n"
    pushed = await gw.run(scoped, f"git-receive-pack '{app}.git'")
    assert pushed.code == 1 and "is read-only: it cannot push" in pushed.stderr


# -- commands --


async def test_whoami_names_account_and_key(gw: LiveGateway):
    alice = await gw.user("alice")
    reply = await gw.run(alice, "whoami")
    assert reply.code == 0
    assert reply.stdout == (
        f"user: {alice.name}\nkey: laptop ({alice.fingerprint})\nexpires: never\n"
    )


async def test_keys_lists_adds_and_removes_the_accounts_keys(gw: LiveGateway):
    alice = await gw.user("alice")
    listed = await gw.run(alice, "keys")
    assert listed.code == 0 and "laptop" in listed.stdout and alice.fingerprint in listed.stdout
    second = asyncssh.generate_private_key("ssh-ed25519")
    text = second.export_public_key("openssh").decode()
    added = await gw.run(alice, "keys add desktop", stdin=text)
    assert added.code == 0, added.stderr
    assert (await gw.run(second, "whoami")).stdout.startswith(f"user: {alice.name}\n")
    assert (await gw.run(alice, "keys remove desktop")).code == 0
    with pytest.raises(asyncssh.PermissionDenied):
        async with gw.connect(second):
            pass


async def test_help_lists_every_command(gw: LiveGateway):
    alice = await gw.user("alice")
    reply = await gw.run(alice, "help")
    assert reply.code == 0
    for name in ("info", "whoami", "keys", "deploys", "logs", "cancel", "help"):
        assert f"{name}" in reply.stdout


async def test_an_unknown_command_gets_one_line_and_gits_exit_code(gw: LiveGateway):
    alice = await gw.user("alice")
    reply = await gw.run(alice, "rm -rf /")
    assert reply.code == 128
    assert reply.stdout == ""
    assert reply.stderr.count("\n") == 1
    assert reply.stderr.startswith("error: unknown command 'rm': this server serves git")


async def test_regression_an_unknown_app_and_a_forbidden_app_look_the_same(gw: LiveGateway):
    owner, mallory = await gw.user("owner"), await gw.user("mallory")
    secret = await gw.app(owner)
    forbidden = await gw.run(mallory, f"git-upload-pack '{secret}.git'")
    missing = await gw.run(mallory, "git-upload-pack 'nosuchapp.git'")
    assert forbidden.code == missing.code != 0
    assert forbidden.stderr.replace(secret, "X") == missing.stderr.replace("nosuchapp", "X")
    assert forbidden.stderr == f"error: repository '{secret}' not found or access denied\n"
    assert (await gw.run(mallory, f"deploys {secret}")).stderr == forbidden.stderr


async def test_regression_a_subsystem_request_is_refused(gw: LiveGateway):
    alice = await gw.user("alice")
    async with gw.connect(alice.key) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.start_sftp_client()


async def test_regression_a_hostile_command_line_changes_nothing(gw: LiveGateway, tmp_path):
    alice = await gw.user("alice")
    app = await gw.app(alice)
    for command in (
        f"git-upload-pack '{app}.git'; touch {tmp_path}/owned",
        f"git-upload-pack '../{app}.git'",
        f"git-upload-pack '{app}.git' --upload-pack=touch",
        "keys add 'x\x00y'",
        "'unterminated",
    ):
        reply = await gw.run(alice, command)
        assert reply.code != 0 and reply.stderr.count("\n") == 1, (command, reply)
    assert not (tmp_path / "owned").exists()
    assert json.loads(await gw.admin("key", "list", alice.name, "--json"))[0]["name"] == "laptop"
    assert len(json.loads(await gw.admin("key", "list", alice.name, "--json"))) == 1


async def test_a_person_with_two_apps_sees_both(gw: LiveGateway):
    alice: Person = await gw.user("alice")
    apps = [await gw.app(alice), await gw.app(alice)]
    reply = await gw.run(alice, "info")
    for app in apps:
        assert f"  {app}  owner" in reply.stdout
