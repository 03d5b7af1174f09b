"""Nothing a user can read is ever reused: after an app is removed, a new app (same name or
not) gets new deploy ids and never sees the removed app's deploy logs; a log file on disk is
never shown as a new deploy's log."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import Admin, Client, ServerThread, keygen, unique, write_config

SECRET = "DATABASE_URL=postgres://alice:s3cr3t-0f-alice@db/shop"


@pytest.fixture(scope="module")
def gw(module_gateways):
    """A gateway whose deploy prints the pushed `env` file, as a chatty build would."""
    return module_gateways(name="reuse", deploy={"command": ["cat", "env"]})


def person(gw: ServerThread, tmp_path: Path, prefix: str) -> Client:
    admin = Admin(gw.config_path)
    name = unique(prefix)
    key = keygen(tmp_path / f"{name}-key")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    return Client(tmp_path / f"home-{name}", key, gw, name=name)


def push_env(client: Client, app: str, text: str, work: Path):
    if not work.exists():
        client.new_repo(work, {"env": text})
    else:
        client.commit(work, {"env": text}, "change")
    return client.git("push", client.url(app), "main", cwd=work, check=False)


def deploy_ids(admin: Admin, app: str) -> list[int]:
    return [d["id"] for d in json.loads(admin.ok("deploy", "list", app, "--json"))]


def test_regression_a_removed_apps_ids_and_logs_never_reach_a_new_app(gw, tmp_path):
    admin = Admin(gw.config_path)
    alice, mallory = person(gw, tmp_path, "alice"), person(gw, tmp_path, "mallory")
    shop = unique("shop")
    admin.ok("app", "create", shop, "--owner", alice.name)
    first = push_env(alice, shop, SECRET + "\n", tmp_path / "alice-work")
    assert first.returncode == 0 and SECRET in first.stderr  # her own log: fine
    (old_id,) = deploy_ids(admin, shop)
    assert SECRET in admin.ok("deploy", "logs", str(old_id))

    out = admin.ok("app", "remove", shop)
    assert "moved to" in out
    (archived,) = gw.repos.glob(f".trash/*/{shop}.deploys/{old_id}.log")
    assert SECRET in archived.read_text()
    assert (archived.parent.parent / f"{shop}.git").is_dir()  # next to its repository
    audit = json.loads(admin.ok("audit", "--app", shop, "--json"))
    assert audit[0]["event"] == "app_removed"
    assert audit[0]["detail"]["deploy_logs"] == str(archived.parent)

    # A new owner takes the same name, and another app besides: new ids, none of the text.
    other = unique("other")
    admin.ok("app", "create", shop, "--owner", mallory.name)
    admin.ok("app", "create", other, "--owner", mallory.name)
    for app in (shop, other):
        result = push_env(mallory, app, "hello\n", tmp_path / f"mallory-{app}")
        assert result.returncode == 0, result.stderr
        assert "s3cr3t" not in result.stderr
        (new_id,) = deploy_ids(admin, app)
        assert new_id > old_id
        logs = mallory.ssh("logs", app)
        assert logs.returncode == 0 and "hello" in logs.stdout and "s3cr3t" not in logs.stdout
    code, _, err = admin("deploy", "logs", str(old_id))
    assert code == 1 and f"no deploy #{old_id}" in err
    stale = mallory.ssh("logs", shop, str(old_id))
    assert stale.returncode != 0 and "s3cr3t" not in stale.stdout + stale.stderr


def next_deploy_id(gw: ServerThread) -> int:
    with sqlite3.connect(gw.config.storage.database) as db:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'deploys'").fetchone()
    return (row[0] if row else 0) + 1


def test_regression_a_planted_log_file_is_never_shown(gw, tmp_path):
    """Logs live in the registry: a file planted where earlier versions wrote logs, named
    after the next deploy, is neither read nor changed."""
    admin = Admin(gw.config_path)
    bob = person(gw, tmp_path, "bob")
    app = unique("planted")
    admin.ok("app", "create", app, "--owner", bob.name)
    deploy_id = next_deploy_id(gw)
    log_dir = gw.config.deploy.log_dir
    log_dir.mkdir(exist_ok=True)
    planted = log_dir / f"{deploy_id}.log"
    planted.write_text(f"{SECRET}\n")
    result = push_env(bob, app, "bob's env\n", tmp_path / "work")
    assert result.returncode == 0 and f"deploy #{deploy_id} succeeded" in result.stderr
    assert "s3cr3t" not in result.stderr
    logs = bob.ssh("logs", app, str(deploy_id))
    assert "s3cr3t" not in logs.stdout and "bob's env" in logs.stdout
    assert planted.read_text() == f"{SECRET}\n"


def test_regression_log_files_of_an_earlier_version_are_imported_once(tmp_path):
    """At start, the log file an earlier version wrote for a deploy still recorded goes into
    the registry; every such file is then set aside, and its id is never handed out again:
    a file left for a deploy whose record is gone never becomes a new deploy's log."""
    config = write_config(tmp_path / "gw", deploy={"command": ["cat", "env"]})
    server = ServerThread(config).start()
    try:
        admin = Admin(config)
        carol = person(server, tmp_path, "carol")
        admin.ok("app", "create", "web", "--owner", carol.name)
        assert push_env(carol, "web", "one\n", tmp_path / "work").returncode == 0
    finally:
        server.stop()
    # What an upgraded installation holds: deploy 1's log only as a file, and a stray file.
    with sqlite3.connect(server.config.storage.database) as db:
        db.execute("DELETE FROM deploy_log_chunks")
    log_dir = server.config.deploy.log_dir
    log_dir.mkdir()
    (log_dir / "1.log").write_text("output of deploy 1, by the earlier version\n")
    (log_dir / "40.log").write_text(f"{SECRET}\n")
    server = ServerThread(config).start()
    try:
        assert "by the earlier version" in admin.ok("deploy", "logs", "1")
        carol = Client(tmp_path / "home-again", carol.key, server, name=carol.name)  # new port
        result = push_env(carol, "web", "two\n", tmp_path / "work")
        assert result.returncode == 0 and "deploy #41 succeeded" in result.stderr
        assert "s3cr3t" not in admin.ok("deploy", "logs", "41")
        assert not list(log_dir.glob("*.log"))  # set aside: never read again
        (aside,) = log_dir.glob("imported-*")
        assert (aside / "40.log").read_text() == f"{SECRET}\n"
    finally:
        server.stop()
