"""The operator CLI, run in-process against a real SQLite file and repository root."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Admin, keygen, keygen_fingerprint, run, write_config
from tests.unit.test_keys import sk_ed25519_line


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(write_config(tmp_path))


@pytest.fixture
def pub(tmp_path: Path):
    def make(name: str, kind: str = "ed25519", bits: int | None = None) -> Path:
        return Path(f"{keygen(tmp_path / name, kind, bits)}.pub")

    return make


def test_user_lifecycle(admin):
    assert admin("user", "add", "alice")[0] == 0
    code, _, err = admin("user", "add", "alice")
    assert code == 1 and err == "error: user 'alice' already exists\n"
    code, _, err = admin("user", "add", "Bad Name")
    assert code == 1 and "invalid user name" in err
    out = admin.ok("user", "list", "--json")
    assert [u["name"] for u in json.loads(out)] == ["alice"]
    assert "alice" in admin.ok("user", "list")
    admin.ok("user", "remove", "alice")
    code, _, err = admin("user", "remove", "alice")
    assert code == 1 and "no such user" in err


def test_key_add_list_remove(admin, pub):
    admin.ok("user", "add", "alice")
    key = pub("alice_ed")
    out = admin.ok("key", "add", "alice", "laptop", str(key))
    assert keygen_fingerprint(key) in out
    ecdsa = pub("alice_ec", "ecdsa", 384)
    admin.ok("key", "add", "alice", "desktop", "-", stdin=ecdsa.read_text())
    listing = json.loads(admin.ok("key", "list", "alice", "--json"))
    by_name = {k["name"]: k for k in listing}
    assert by_name["laptop"]["fingerprint"] == keygen_fingerprint(key)
    assert by_name["laptop"]["fingerprint_md5"] == keygen_fingerprint(key, md5=True)
    assert by_name["desktop"]["bits"] == 384
    assert by_name["desktop"]["algorithm"] == "ecdsa-sha2-nistp384"
    assert by_name["laptop"]["last_used_at"] is None
    table = admin.ok("key", "list", "alice")
    for column in ("NAME", "TYPE", "BITS", "FINGERPRINT", "MD5", "CREATED", "LAST USED"):
        assert column in table
    assert keygen_fingerprint(ecdsa, md5=True) in table
    admin.ok("key", "remove", "alice", "desktop")
    assert [k["name"] for k in json.loads(admin.ok("key", "list", "alice", "--json"))] == ["laptop"]


def test_key_on_another_account_is_refused(admin, pub):
    admin.ok("user", "add", "alice")
    admin.ok("user", "add", "bob")
    key = pub("shared")
    admin.ok("key", "add", "alice", "laptop", str(key))
    code, out, err = admin("key", "add", "bob", "laptop", str(key))
    assert (code, out, err) == (1, "", "error: this SSH key is already used by another account\n")
    code, _, err = admin("key", "add", "alice", "other", str(key))
    assert code == 1 and "under the name 'laptop'" in err
    assert json.loads(admin.ok("key", "list", "bob", "--json")) == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda pub: pub("dsa", "dsa").read_text(), "DSA keys are refused"),
        (lambda pub: pub("rsa1024", "rsa", 1024).read_text(), "RSA key too small (1024 bits)"),
        (lambda pub: Path(str(pub("priv"))[:-4]).read_text(), "PRIVATE key"),
        (lambda pub: pub("a").read_text() + pub("b").read_text(), "one key at a time"),
        (lambda pub: "not a key at all", "not an OpenSSH public key"),
    ],
)
def test_refused_keys_store_nothing(admin, pub, make, reason):
    admin.ok("user", "add", "alice")
    code, _, err = admin("key", "add", "alice", "k", "-", stdin=make(pub))
    assert code == 1
    assert reason in err and err.count("\n") == 1
    assert json.loads(admin.ok("key", "list", "alice", "--json")) == []


def test_security_keys_accepted(admin):
    admin.ok("user", "add", "alice")
    out = admin.ok("key", "add", "alice", "yubikey", "-", stdin=sk_ed25519_line())
    assert "ED25519-SK" in out


def test_app_lifecycle(admin, tmp_path):
    admin.ok("user", "add", "alice")
    admin.ok("user", "add", "bob")
    out = admin.ok("app", "create", "web", "--owner", "alice", "--branch", "master")
    assert "ssh://git@127.0.0.1:0/web.git" in out
    repo = tmp_path / "repos" / "web.git"
    assert (repo / "HEAD").read_text() == "ref: refs/heads/master\n"
    code, _, err = admin("app", "create", "web", "--owner", "bob")
    assert code == 1 and "already exists" in err
    code, _, err = admin("app", "create", "../evil", "--owner", "bob")
    assert code == 1 and "invalid app name" in err
    code, _, err = admin("app", "create", "api", "--owner", "nobody")
    assert code == 1 and "no such user" in err
    assert not (tmp_path / "repos" / "api.git").exists()
    apps = json.loads(admin.ok("app", "list", "--json"))
    assert [(a["name"], a["owner_name"], a["deploy_branch"]) for a in apps] == [
        ("web", "alice", "master")
    ]
    assert "granted read" in admin.ok("app", "grant", "web", "bob", "read")
    assert "read -> write" in admin.ok("app", "grant", "web", "bob", "write")
    members = json.loads(admin.ok("app", "members", "web", "--json"))
    assert members == [
        {"user": "alice", "role": "owner", "since": members[0]["since"]},
        {"user": "bob", "role": "write", "since": members[1]["since"]},
    ]
    code, _, _ = admin("app", "grant", "web", "bob", "superuser")
    assert code == 2
    admin.ok("app", "revoke", "web", "bob")
    code, _, err = admin("user", "remove", "alice")
    assert code == 1 and "owns apps (web)" in err
    out = admin.ok("app", "remove", "web")
    assert not repo.exists()
    trashed = list((tmp_path / "repos" / ".trash").glob("*/web.git"))
    assert len(trashed) == 1 and (trashed[0] / "HEAD").is_file()
    assert str(trashed[0]) in out
    assert json.loads(admin.ok("app", "list", "--json")) == []


def test_usage_and_config_errors_exit_2(admin, tmp_path):
    assert admin("app", "create", "web")[0] == 2  # --owner missing
    assert admin("frobnicate")[0] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[ssh]\nbogus = 1\n")
    admin_bad = Admin(bad)
    code, _, err = admin_bad("user", "list")
    assert code == 2 and err == "error: config: unknown key [ssh] bogus\n"
    code, _, err = Admin(tmp_path / "missing.toml")("user", "list")
    assert code == 2 and "file not found" in err


def test_check_reports_git(admin):
    assert "git 2." in admin.ok("check")


def test_config_show(admin, tmp_path):
    out = admin.ok("config", "show")
    assert 'listen = "127.0.0.1:0"' in out
    assert str(tmp_path / "repos") in out


def test_module_entry_point_and_console_script(tmp_path):
    env = {**os.environ, "GATEWAY_CONFIG": str(write_config(tmp_path))}
    result = run([sys.executable, "-m", "gateway", "--help"], env=env, check=True)
    assert "serve" in result.stdout and "app" in result.stdout
    result = run([sys.executable, "-m", "gateway", "user", "list"], env=env, check=True)
    assert "USER" in result.stdout
    script = Path(sys.executable).parent / "git-gateway"
    if script.exists():
        assert run([str(script), "--version"], env=env, check=True).stdout.startswith("git-gateway")


def test_cli_never_prints_a_traceback(tmp_path):
    env = {**os.environ, "GATEWAY_CONFIG": str(write_config(tmp_path))}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "key", "add", "nobody", "k", "/nonexistent.pub"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read /nonexistent.pub")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command", [("key", "add", "bob", "laptop"), ("app", "key", "add", "web", "ci")]
)
@pytest.mark.parametrize("stdin", ["terminal", "pipe"])
def test_key_add_without_a_file_prints_its_usage_instead_of_waiting(tmp_path, command, stdin):
    """Standard input is read only when told to (`-`): a forgotten FILE, on a terminal or on
    a pipe that never ends (an ssh session, a cron job), ends at once with the usage."""
    env = {**os.environ, "GATEWAY_CONFIG": str(write_config(tmp_path)), "COLUMNS": "200"}
    primary, secondary = pty.openpty() if stdin == "terminal" else os.pipe()
    try:
        # Nothing is ever written to this stdin, and it is never closed while the CLI runs.
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *command],
            env=env,
            stdin=secondary if stdin == "terminal" else primary,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(primary)
        os.close(secondary)
    assert result.returncode == 2
    usage, error = result.stderr.splitlines()
    assert usage.startswith(f"usage: git-gateway {' '.join(command[:-2])} ")
    assert usage.endswith(" [FILE]")
    assert error == (
        f"git-gateway {' '.join(command[:-2])}: error: give the public key's FILE, or - to read "
        "it from standard input"
    )
