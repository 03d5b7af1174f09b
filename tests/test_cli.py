"""The operator CLI, run in-process against a real SQLite file and repository root."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import sqlite3
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


def latest_schema() -> int:
    from gateway.store.sqlite import migrations

    return len(migrations())


def test_check_reads_the_sqlite_registry_without_creating_or_migrating_it(tmp_path):
    """`check` says what `serve` will find, and changes nothing: a missing registry stays
    missing (serve creates it), an existing one is read through no -wal/-shm of its own."""
    database = tmp_path / "var" / "sub" / "gw.db"
    admin = Admin(write_config(tmp_path, storage={"database": str(database)}))
    out = admin.ok("check")
    assert out.splitlines()[-1] == f"registry ok (sqlite {database}: created on first start)"
    assert not (tmp_path / "var").exists()
    admin.ok("user", "add", "alice")  # opens the registry as serve does: created, migrated
    before = sorted(p.name for p in database.parent.iterdir())
    out = admin.ok("check")
    assert out.splitlines()[-1] == f"registry ok (sqlite {database}, schema {latest_schema()})"
    assert sorted(p.name for p in database.parent.iterdir()) == before == ["gw.db"]


def foreign_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d.write_bytes(b"not a database" * 100), "file is not a database"),
        (lambda d: d.mkdir(), "not a regular file"),
        (foreign_database, "a SQLite database without the gateway's schema_migrations"),
    ],
)
def test_check_refuses_what_is_not_a_registry(tmp_path, make, reason):
    database = tmp_path / "gw.db"
    make(database)
    code, _, err = Admin(write_config(tmp_path, storage={"database": str(database)}))("check")
    assert code == 1 and err == f"error: registry unusable: sqlite {database}: {reason}\n"


def test_check_names_a_registry_directory_it_cannot_create(tmp_path):
    (tmp_path / "afile").write_text("x")
    database = tmp_path / "afile" / "gw.db"
    code, _, err = Admin(write_config(tmp_path, storage={"database": str(database)}))("check")
    reason = f"{tmp_path / 'afile'} is not a directory"
    assert code == 1 and err == f"error: registry unusable: sqlite {database}: {reason}\n"


def test_check_with_postgresql_down_says_which_and_why_in_one_line(tmp_path):
    """A stopped server (a closed port): exit 1, the database named, its password masked."""
    env = {
        **os.environ,
        "GATEWAY_CONFIG": str(write_config(tmp_path)),
        "GATEWAY_DATABASE_URL": "postgresql://gw:s3cret@127.0.0.1:9/registry",
    }
    result = run([sys.executable, "-m", "gateway", "check"], env=env)
    assert result.returncode == 1
    assert result.stdout.startswith("config ok")
    assert result.stderr.startswith(
        "error: cannot reach the registry at postgresql://gw:********@127.0.0.1:9/registry: "
    )
    assert result.stderr.count("\n") == 1 and "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_check_reads_a_postgresql_registry_without_migrating_it(tmp_path, pg_url):
    from gateway.store.postgres import migrations

    config = str(write_config(tmp_path))
    env = {**os.environ, "GATEWAY_CONFIG": config, "GATEWAY_DATABASE_URL": pg_url}
    where = pg_url.split("@", 1)[1]  # host:port/database
    for _ in range(2):  # still empty the second time: nothing was created
        result = run([sys.executable, "-m", "gateway", "check"], env=env)
        assert result.returncode == 0, result.stderr
        last = result.stdout.splitlines()[-1]
        assert last == f"registry ok (postgresql {where}: created on first start)"
    run([sys.executable, "-m", "gateway", "db", "migrate"], env=env, check=True)
    result = run([sys.executable, "-m", "gateway", "check"], env=env)
    assert result.stdout.splitlines()[-1] == (
        f"registry ok (postgresql {where}, schema {len(migrations())})"
    )


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


def test_regression_deploy_show_lists_webhook_attempts(admin, tmp_path):
    """`deploy show` of a deploy with webhook deliveries printed nothing but a crash ("str
    not callable": a local variable hid the time formatter); each attempt is one line."""
    import asyncio
    from datetime import UTC, datetime

    from gateway.models import NewDeploy, WebhookDelivery
    from gateway.store import open_store

    admin.ok("user", "add", "alice")
    admin.ok("app", "create", "web", "--owner", "alice")

    async def seed() -> int:
        store = await open_store(str(tmp_path / "gw.db"))
        try:
            app = await store.get_app("web")
            new = NewDeploy(
                app.id,
                "refs/heads/main",
                "0" * 40,
                "1" * 40,
                "alice",
                "",
                "s",
                "a",
                "detached",
                "webhook",
            )
            deploy = await store.create_deploy(new)
            at = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
            failed = WebhookDelivery(
                deploy.id, 1, "https://ci.example/hook", None, "timed out", 5000, at
            )
            await store.add_webhook_delivery(failed)
            ok = WebhookDelivery(deploy.id, 2, "https://ci.example/hook", 204, "", 80, at)
            await store.add_webhook_delivery(ok)
            return deploy.id
        finally:
            await store.close()

    deploy_id = asyncio.run(seed())
    out = admin.ok("deploy", "show", str(deploy_id))
    assert "webhook attempt 1: timed out in 5000 ms at 2026-12-07" in out
    assert "webhook attempt 2: 204 in 80 ms at 2026-12-07" in out
