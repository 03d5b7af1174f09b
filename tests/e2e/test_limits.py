"""Edge limits and the crypto policy, against real clients: floods are bounded, legitimate
parallel work passes."""

from __future__ import annotations

import asyncio
import subprocess

import asyncssh
import pytest

from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    banner,
    keygen,
    raw,
    run,
    settle,
    ssh_connect,
    unique,
)


def test_per_address_and_total_caps(gateway_factory, tmp_path):
    server = gateway_factory(
        limits={"max_connections": 3, "max_connections_per_address": 2, "max_unauthenticated": 10},
    )
    held = []
    try:
        for _ in range(2):
            held.append(raw(server, "127.0.0.1"))
            assert banner(held[-1]).startswith(b"SSH-2.0")
        third = raw(server, "127.0.0.1")
        held.append(third)
        assert banner(third) == b""  # per-address cap
        other = raw(server, "127.0.0.2")
        held.append(other)
        assert banner(other).startswith(b"SSH-2.0")  # other addresses are not affected
        fourth = raw(server, "127.0.0.3")
        held.append(fourth)
        assert banner(fourth) == b""  # total cap: 3 connections are open
    finally:
        for sock in held:
            sock.close()


def test_auth_attempts_are_capped_counting_probes(tight, tight_user, tmp_path):
    strangers = [keygen(tmp_path / f"stranger{i}") for i in range(5)]
    identities = [a for key in strangers for a in ("-i", str(key))]
    base = [*tight_user.ssh_base[:3], *tight_user.ssh_base[5:]]  # without the user's key
    result = run(
        [*base, *identities, "-i", str(tight_user.key), "-T", "git@127.0.0.1"], env=tight_user.env
    )
    assert result.returncode == 255
    assert "Too many authentication failures" in result.stderr
    # Within the limit, the right key still gets in after a few wrong ones.
    result = run(
        [*base, *identities[:4], "-i", str(tight_user.key), "-T", "git@127.0.0.1"],
        env=tight_user.env,
    )
    assert result.returncode == 0, result.stderr
    settle(tight)


async def test_sessions_per_connection(tight, tight_user):
    async with ssh_connect(tight.port, tight_user.key) as conn:
        command = f"git-upload-pack '{tight_user.app}.git'"
        held = [await conn.create_process(command, encoding=None) for _ in range(2)]
        for process in held:  # both are being served: they sent their ref advertisement
            assert await asyncio.wait_for(process.stdout.read(4), 30)
        # The third channel is refused when it opens, before any command is sent.
        with pytest.raises(asyncssh.ChannelOpenError) as refused:
            await asyncio.wait_for(conn.run(command, encoding=None), 30)
        assert refused.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert refused.value.reason == "too many sessions on this connection (limit 2)"
        for process in held:
            process.stdin.write(b"0000")
            process.stdin.write_eof()
            await asyncio.wait_for(process.wait(), 30)
        # Closed channels free their slots.
        again = await asyncio.wait_for(conn.run(command, input=b"0000", encoding=None), 30)
        assert again.exit_status == 0
    await asyncio.get_running_loop().run_in_executor(None, settle, tight)


def test_per_user_rate_limit(tight, tight_user):
    results = [
        tight_user.git("ls-remote", tight_user.url(tight_user.app), check=False) for _ in range(4)
    ]
    assert [r.returncode for r in results[:3]] == [0, 0, 0]
    assert results[3].returncode != 0
    assert (
        f"too many git operations for {tight_user.name} (limit 3 per minute)" in results[3].stderr
    )
    assert tight_user.ssh().returncode == 0  # the welcome is not a git operation
    settle(tight)


def test_idle_transfer_is_cut(tight, tmp_path):
    admin = Admin(tight.config_path)
    name, app = unique("idle"), unique("idleapp")
    key = keygen(tmp_path / "idle_id")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", name)
    client = Client(tmp_path / "idlehome", key, tight, name=name)
    # A client that opens upload-pack, reads the advertisement, then sends nothing.
    proc = subprocess.Popen(
        [*client.ssh_base, "-T", "git@127.0.0.1", f"git-upload-pack '{app}.git'"],
        env=client.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        proc.wait(timeout=TIMEOUT)  # stdin stays open and silent: the server must end it
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.stdin.close()
    assert proc.returncode == 1
    assert b"error: transfer idle for 1s: closing" in err
    settle(tight)


def test_ci_fan_out_from_one_address_passes_with_defaults(owner, app, tmp_path):
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    clones = [
        subprocess.Popen(
            ["git", "clone", "-q", owner.url(app), str(tmp_path / f"clone{i}")],
            env=owner.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(50)
    ]
    failures = []
    for proc in clones:
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(err.decode())
    assert failures == []
    assert all((tmp_path / f"clone{i}" / "README").is_file() for i in range(50))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("Ciphers=aes128-cbc", "no matching cipher found"),
        ("KexAlgorithms=diffie-hellman-group14-sha1", "no matching key exchange method found"),
        ("KexAlgorithms=diffie-hellman-group1-sha1", "no matching key exchange method found"),
        ("HostKeyAlgorithms=ssh-rsa", "no matching host key type found"),
        ("HostKeyAlgorithms=ssh-dss", "no matching host key type found"),
    ],
)
def test_weak_algorithms_are_not_negotiated(owner, option, message):
    result = owner.ssh(options=("-T", "-o", option))
    assert result.returncode == 255 and message in result.stderr


def test_default_negotiation_is_modern_and_strict(owner):
    result = owner.ssh(options=("-T", "-vvv"))
    assert result.returncode == 0
    log = result.stderr
    assert "will use strict KEX ordering" in log  # Terrapin countermeasure
    assert "kex: algorithm: curve25519-sha256" in log
    # OpenSSH's own preference picks the cipher: chacha20 first (tests/e2e/test_clients.py
    # covers every cipher family and client).
    assert "cipher: chacha20-poly1305@openssh.com" in log


def test_sha1_rsa_signatures_are_refused(server, admin, tmp_path):
    name = unique("rsa")
    key = keygen(tmp_path / "rsa_id", "rsa", 3072)
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    client = Client(tmp_path / "rsahome", key, server, name=name)
    assert client.ssh().returncode == 0  # rsa-sha2-512 by default
    result = client.ssh(options=("-T", "-o", "PubkeyAcceptedAlgorithms=ssh-rsa"))
    assert result.returncode == 255 and "Permission denied" in result.stderr
