"""Every maintained SSH client clones and pushes, and nothing weak is negotiated.

The clients are the real programs people use: OpenSSH pinned to each cipher family, PuTTY's
plink, Dropbear's dbclient, paramiko and libgit2 (pygit2, with Debian's libgit2 and
libssh2). Each one pushes, clones and pushes again; the gateway's `auth_ok` log line says
which cipher and MAC each connection negotiated, and the tests check them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import socket
import struct
from pathlib import Path

import pytest

from gateway.config import SSHSettings
from tests.conftest import MakeUser
from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    GatewayFactory,
    GatewayHandle,
    ServerThread,
    fsck,
    keygen,
    keygen_fingerprint,
    run,
    server_refs,
    settle,
    unique,
)

HERE = Path(__file__).resolve().parent
# CI installs the clients (.ci/run), so that a missing one fails instead of skipping.
REQUIRED = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"
# pygit2 and paramiko come from Debian's packages, for Debian's own python: the point is
# the system libgit2 and libssh2 that every libgit2-based tool on the machine uses.
DEBIAN_PYTHON = "/usr/bin/python3"

_DEFAULTS = {f.name: f.metadata["default"] for f in dataclasses.fields(SSHSettings)}
CIPHERS = set(_DEFAULTS["ciphers"])
MACS = set(_DEFAULTS["macs"]) | {"implicit"}  # implicit: an AEAD cipher's own tag
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def need_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRED:
            pytest.fail(f"{name} not found (apt-get install {package})")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return path


def need_debian_module(module: str, package: str) -> None:
    found = Path(DEBIAN_PYTHON).exists() and (
        run([DEBIAN_PYTHON, "-c", f"import {module}"]).returncode == 0
    )
    if not found:
        if REQUIRED:
            pytest.fail(f"{DEBIAN_PYTHON} cannot import {module} (apt-get install {package})")
        pytest.skip(f"{module} for {DEBIAN_PYTHON} is not installed (apt-get install {package})")


@pytest.fixture
def logins(caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    """The gateway's auth_ok lines of one user, as dicts (cipher, mac, client...)."""
    caplog.set_level(logging.INFO, logger="gateway.server")

    def of(user: str) -> list[dict[str, str]]:
        found = []
        for record in caplog.records:
            message = record.getMessage()
            if record.name == "gateway.server" and message.startswith("event=auth_ok "):
                fields = {
                    k: json.loads(v) if v.startswith('"') else v for k, v in _PAIR.findall(message)
                }
                if fields.get("user") == user:
                    found.append(fields)
        return found

    return of


def host_key_line(server: ServerThread, kind: str = "ed25519") -> str:
    """`ssh-ed25519 AAAA...` of the gateway's host key."""
    pub = server.config.ssh.host_key_dir / f"ssh_host_{kind}_key.pub"
    return " ".join(pub.read_text().split()[:2])


def round_trip(client: Client, app: str, tmp_path: Path, env: dict[str, str]) -> str:
    """Push a first commit, clone it back and push a second one, all with `env`'s client;
    return the second commit."""
    saved = client.env
    client.env = {**saved, **env}
    try:
        work = client.new_repo(tmp_path / "work", {"README": "from the client\n"})
        client.git("push", "-q", client.url(app), "main", cwd=work)
        copy = tmp_path / "copy"
        client.git("clone", "-q", client.url(app), str(copy))
        assert (copy / "README").read_text() == "from the client\n"
        second = client.commit(copy, {"second.txt": "again\n"}, "second")
        client.git("push", "-q", "origin", "main", cwd=copy)
    finally:
        client.env = saved
    assert server_refs(client.server.repo(app))["refs/heads/main"] == second
    fsck(client.server.repo(app))
    return second


@pytest.fixture
def user_app(make_user: MakeUser, admin: Admin) -> tuple[Client, str]:
    client = make_user("cl")
    app = unique("clapp")
    admin.ok("app", "create", app, "--owner", client.name)
    return client, app


# -- OpenSSH, pinned to each cipher family (hardening guides, FIPS-style configs) --


@pytest.mark.parametrize(
    ("cipher", "mac"),
    [
        ("aes128-gcm@openssh.com", "implicit"),
        ("aes256-gcm@openssh.com", "implicit"),
        ("chacha20-poly1305@openssh.com", "implicit"),
        # OpenSSH prefers UMAC, which is not offered: it takes the first SHA-2 ETM MAC.
        ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
        ("aes256-ctr", "hmac-sha2-256-etm@openssh.com"),
    ],
)
def test_openssh_pinned_cipher_clones_and_pushes(user_app, logins, tmp_path, cipher, mac):
    client, app = user_app
    # The client's own view: this cipher, strict KEX (the Terrapin countermeasure).
    probe = client.ssh(options=("-T", "-vvv", "-c", cipher))
    assert probe.returncode == 0, probe.stderr
    assert f"kex: client->server cipher: {cipher}" in probe.stderr
    assert "will use strict KEX ordering" in probe.stderr

    round_trip(
        client, app, tmp_path, {"GIT_SSH_COMMAND": " ".join([*client.ssh_base, "-c", cipher])}
    )
    seen = logins(client.name)
    assert len(seen) >= 4  # the probe, two pushes, one clone
    assert {(s["cipher"], s["mac"]) for s in seen} == {(cipher, mac)}
    assert all(s["client"].startswith("SSH-2.0-OpenSSH_") for s in seen)


def test_openssh_default_picks_chacha20_first(user_app, logins):
    """OpenSSH clients pick by their own preference: chacha20 as soon as it is offered.
    That is the accepted cost of serving the clients that need it (see the README)."""
    client, _ = user_app
    assert client.ssh().returncode == 0
    assert logins(client.name)[-1]["cipher"] == "chacha20-poly1305@openssh.com"


# -- PuTTY's plink (Windows users, TortoiseGit) --


def test_plink_clones_and_pushes(user_app, logins, server, tmp_path):
    plink = need_program("plink", "putty-tools")
    puttygen = need_program("puttygen", "putty-tools")
    client, app = user_app
    ppk = tmp_path / "key.ppk"
    run([puttygen, str(client.key), "-O", "private", "-o", str(ppk)], check=True)
    fingerprint = keygen_fingerprint(server.config.ssh.host_key_dir / "ssh_host_ed25519_key.pub")
    # -batch: never prompt; -hostkey: the only host key accepted (plink's known_hosts).
    command = [plink, "-batch", "-hostkey", fingerprint, "-i", str(ppk)]
    env = {"GIT_SSH_COMMAND": shlex.join(command), "GIT_SSH_VARIANT": "plink"}
    round_trip(client, app, tmp_path, env)
    seen = logins(client.name)
    assert len(seen) == 3 and all(s["client"].startswith("SSH-2.0-PuTTY_") for s in seen)
    assert all(s["cipher"] in CIPHERS and s["mac"] in MACS for s in seen), seen

    # A host key other than the one pinned is refused: the pinning above is real.
    other = keygen_fingerprint(Path(f"{keygen(tmp_path / 'not_the_host')}.pub"))
    wrong = run(
        [
            plink,
            "-batch",
            "-hostkey",
            other,
            "-i",
            str(ppk),
            "-P",
            str(server.port),
            "git@127.0.0.1",
        ],
        env=client.env,
    )
    assert wrong.returncode != 0


# -- Dropbear's dbclient (embedded systems, small containers) --


def dropbear_client(client: Client, server: ServerThread, tmp_path: Path) -> Path:
    """Convert the user's key to Dropbear's format and trust the gateway's host key in
    Dropbear's known_hosts (keyed by host name only, without the port)."""
    convert = need_program("dropbearconvert", "dropbear-bin")
    need_program("dbclient", "dropbear-bin")
    key = tmp_path / "key.dropbear"
    run([convert, "openssh", "dropbear", str(client.key), str(key)], check=True)
    ssh_dir = client.home / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    (ssh_dir / "known_hosts").write_text(f"127.0.0.1 {host_key_line(server)}\n")
    return key


@pytest.mark.parametrize(
    ("options", "cipher", "mac"),
    [
        ((), "chacha20-poly1305@openssh.com", "implicit"),  # its default pick
        # Dropbear 2022.83 has no ETM MACs: AES-CTR needs the one non-ETM SHA-2 MAC.
        (("-c", "aes128-ctr"), "aes128-ctr", "hmac-sha2-256"),
        (("-c", "aes256-ctr"), "aes256-ctr", "hmac-sha2-256"),
    ],
)
def test_dbclient_clones_and_pushes(user_app, logins, server, tmp_path, options, cipher, mac):
    client, app = user_app
    key = dropbear_client(client, server, tmp_path)
    # git passes the port as -p, like OpenSSH (and -o SendEnv, which dbclient ignores).
    command = ["dbclient", "-i", str(key), *options]
    env = {"GIT_SSH_COMMAND": shlex.join(command), "GIT_SSH_VARIANT": "ssh"}
    round_trip(client, app, tmp_path, env)
    seen = logins(client.name)
    assert len(seen) == 3 and all(s["client"].startswith("SSH-2.0-dropbear_") for s in seen)
    assert {(s["cipher"], s["mac"]) for s in seen} == {(cipher, mac)}


def test_dbclient_refuses_a_changed_host_key(user_app, server, tmp_path):
    client, _ = user_app
    key = dropbear_client(client, server, tmp_path)
    impostor = keygen(tmp_path / "impostor")
    (client.home / ".ssh" / "known_hosts").write_text(
        "127.0.0.1 " + " ".join(Path(f"{impostor}.pub").read_text().split()[:2]) + "\n"
    )
    result = run(
        ["dbclient", "-T", "-i", str(key), "-p", str(server.port), "git@127.0.0.1"],
        env=client.env,
    )
    assert result.returncode != 0 and "host key mismatch" in result.stderr


@pytest.fixture(scope="module")
def curve_first(module_gateways: GatewayFactory) -> GatewayHandle:
    """A gateway whose key exchange list starts as Dropbear's does (curve25519-sha256)."""
    kex = ["curve25519-sha256", "mlkem768x25519-sha256", "ecdh-sha2-nistp256"]
    return module_gateways(name="curvefirst", ssh={"kex_algorithms": kex})


@pytest.mark.parametrize("guess", ["wrong", "right"])
def test_regression_dropbear_kex_guess(guess, server, curve_first, tmp_path):
    """dbclient sends a guessed key exchange packet with its KEXINIT. By RFC 4253 the guess
    is wrong when the two sides' first algorithms differ (our default list starts with
    mlkem768x25519-sha256): then it must be ignored, and dbclient sends it again. asyncssh
    alone used the guess and took the second packet for an error ("Key exchange not in
    progress"). When the first algorithms match, the guess must be used."""
    target = server if guess == "wrong" else curve_first
    admin = Admin(target.config_path)
    name = unique("guess")
    key = keygen(tmp_path / "id")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    client = Client(tmp_path / "home", key, target, name=name)
    dropbear = dropbear_client(client, target, tmp_path)
    result = run(
        ["dbclient", "-T", "-i", str(dropbear), "-p", str(target.port), "git@127.0.0.1"],
        env=client.env,
    )
    assert result.returncode == 0, result.stderr
    assert f"Hi {name}!" in result.stdout


# -- paramiko (deploy tools, Ansible-style automation) --


def test_paramiko_clones_and_pushes(user_app, logins, tmp_path):
    need_debian_module("paramiko", "python3-paramiko")
    client, app = user_app
    # paramiko carries git's whole session: an `ssh` for git (GIT_SSH_VARIANT=ssh) whose
    # transport is paramiko's, checking the host key against the same known_hosts.
    command = [
        DEBIAN_PYTHON,
        str(HERE / "paramiko_ssh.py"),
        str(client.key),
        str(client.home / "known_hosts"),
    ]
    env = {"GIT_SSH_COMMAND": shlex.join(command), "GIT_SSH_VARIANT": "ssh"}
    round_trip(client, app, tmp_path, env)
    seen = logins(client.name)
    assert len(seen) == 3 and all(s["client"].startswith("SSH-2.0-paramiko_") for s in seen)
    assert all(s["cipher"] in CIPHERS and s["mac"] in MACS for s in seen), seen


# -- libgit2 through pygit2 (Debian's libgit2 1.5 with libssh2 1.10) --


def test_libgit2_clones_and_pushes(user_app, logins, server, tmp_path):
    need_debian_module("pygit2", "python3-pygit2")
    client, app = user_app
    seed = client.new_repo(tmp_path / "seed")
    client.git("push", "-q", client.url(app), "main", cwd=seed)  # OpenSSH
    ssh_dir = client.home / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    (ssh_dir / "known_hosts").write_text(f"[127.0.0.1]:{server.port} {host_key_line(server)}\n")
    result = run(
        [
            DEBIAN_PYTHON,
            str(HERE / "pygit2_client.py"),
            client.url(app),
            str(client.key),
            str(tmp_path / "libgit2-clone"),
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(client.home)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rejected"] == {}
    assert server_refs(server.repo(app))["refs/heads/main"] == report["pushed"]
    fsck(server.repo(app))
    seen = [s for s in logins(client.name) if s["client"].startswith("SSH-2.0-libssh2_")]
    assert len(seen) == 2  # clone, push
    # libssh2 before 1.11 has neither AES-GCM, chacha20 nor ETM MACs: AES-CTR with the one
    # non-ETM SHA-2 MAC offered is what it can use.
    assert {s["mac"] for s in seen} == {"hmac-sha2-256"}
    assert all(s["cipher"].endswith("-ctr") for s in seen)


def test_libgit2_refuses_an_unknown_host_key(user_app, tmp_path):
    need_debian_module("pygit2", "python3-pygit2")
    client, app = user_app
    (client.home / ".ssh").mkdir(exist_ok=True)  # and no known_hosts in it
    result = run(
        [
            DEBIAN_PYTHON,
            str(HERE / "pygit2_client.py"),
            client.url(app),
            str(client.key),
            str(tmp_path / "libgit2-clone"),
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(client.home)},
    )
    assert result.returncode != 0 and "hostkey" in result.stderr


# -- nothing weak --


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("-c", "aes128-cbc"), "no matching cipher found"),
        (("-c", "aes256-cbc"), "no matching cipher found"),
        (("-c", "3des-cbc"), "no matching cipher found"),
        (("-c", "aes128-ctr", "-o", "MACs=hmac-sha1"), "no matching MAC found"),
        (("-c", "aes128-ctr", "-o", "MACs=hmac-sha1-etm@openssh.com"), "no matching MAC found"),
        (("-c", "aes128-ctr", "-o", "MACs=hmac-sha2-512"), "no matching MAC found"),
        (("-c", "aes128-ctr", "-o", "MACs=umac-64-etm@openssh.com"), "no matching MAC found"),
        (("-o", "KexAlgorithms=diffie-hellman-group14-sha1"), "no matching key exchange"),
        (("-o", "KexAlgorithms=diffie-hellman-group-exchange-sha1"), "no matching key exchange"),
    ],
)
def test_regression_weak_crypto_is_refused(user_app, server, caplog, options, message):
    caplog.set_level(logging.INFO, logger="gateway.server")
    client, _ = user_app
    result = client.ssh(options=("-T", *options))
    assert result.returncode == 255 and message in result.stderr
    settle(server)  # the gateway has seen the connection end
    # The operator sees the refused connection: whichever side notices first, the client
    # (its message above) or the gateway ("No matching ... algorithm found, sent ...").
    failed = [r.getMessage() for r in caplog.records if "event=auth_failed " in r.getMessage()]
    assert len(failed) == 1 and "attempts=0" in failed[0], failed


def test_regression_dbclient_with_sha1_mac_is_refused(user_app, server, tmp_path):
    client, _ = user_app
    key = dropbear_client(client, server, tmp_path)
    result = run(
        [
            "dbclient",
            "-T",
            "-i",
            str(key),
            "-c",
            "aes128-ctr",
            "-m",
            "hmac-sha1",
            "-p",
            str(server.port),
            "git@127.0.0.1",
        ],
        env=client.env,
    )
    assert result.returncode != 0 and "No matching algo mac" in result.stderr


def _packet(payload: bytes) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 section 6), padded to 8 bytes."""
    padding = 8 - (5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + bytes(padding)


@pytest.mark.parametrize(
    "kexinit",
    [
        bytes([20]) + bytes(16) + struct.pack(">I", 50) + b"curve25519-sha256",  # list cut short
        bytes([20]) + bytes(16),  # cookie only
        bytes([20]) + bytes(16) + b"".join(struct.pack(">I", 0) for _ in range(10)),  # no flag
    ],
)
def test_regression_malformed_kexinit_is_refused_cleanly(server, owner, caplog, kexinit):
    """The guess rule reads the client's KEXINIT before asyncssh does: a malformed one must
    still only end that connection, with asyncssh's own protocol error."""
    caplog.set_level(logging.INFO, logger="gateway")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"SSH-2.0-hostile\r\n" + _packet(kexinit))
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"SSH-2.0-git-gateway")
    assert owner.ssh().returncode == 0  # the gateway serves on
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("event=auth_failed" in r.getMessage() for r in caplog.records)
