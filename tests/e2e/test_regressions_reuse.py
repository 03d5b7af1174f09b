"""Nothing a user can read is ever reused: after an app is removed, a new app (same name or
not) gets new deploy ids and never sees the removed app's deploy logs; a log file already on
disk is never appended to nor shown as a new deploy's log."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import Admin, Client, ServerThread, keygen, unique, write_config

SECRET = "DATABASE_URL=postgres://alice:s3cr3t-0f-alice@db/shop"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """A gateway whose deploy prints the pushed `env` file, as a chatty build would."""
    config = write_config(tmp_path_factory.mktemp("reuse"), deploy={"command": ["cat", "env"]})
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


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
    log_dir = gw.config.deploy.log_dir
    assert (log_dir / f"{old_id}.log").exists()

    out = admin.ok("app", "remove", shop)
    assert "moved to" in out
    assert not (log_dir / f"{old_id}.log").exists()
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


def test_regression_a_planted_log_file_is_never_appended_to(gw, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="gateway")
    admin = Admin(gw.config_path)
    bob = person(gw, tmp_path, "bob")
    app = unique("planted")
    admin.ok("app", "create", app, "--owner", bob.name)
    deploy_id = next_deploy_id(gw)
    log_dir = gw.config.deploy.log_dir
    planted = log_dir / f"{deploy_id}.log"
    planted.write_text(f"{SECRET}\n")
    result = push_env(bob, app, "bob's env\n", tmp_path / "work")
    assert result.returncode == 1  # the deploy failed, so the push says so
    assert (
        f"deploy #{deploy_id} FAILED (a log file for deploy #{deploy_id} already existed on the "
        "server: it was set aside, never reused; the operator can see why)"
    ) in result.stderr
    assert "s3cr3t" not in result.stderr
    (aside,) = log_dir.glob(f"{deploy_id}.log.refused-*")
    assert aside.read_text() == f"{SECRET}\n"  # unchanged, kept for the operator
    logs = bob.ssh("logs", app, str(deploy_id))
    assert "s3cr3t" not in logs.stdout and "already existed" in logs.stdout
    assert any(
        f"event=deploy_log_exists deploy={deploy_id} app={app}" in r.getMessage()
        for r in caplog.records
    )
    # The next push deploys normally, with the next id.
    again = push_env(bob, app, "bob's env, again\n", tmp_path / "work")
    assert again.returncode == 0 and f"deploy #{deploy_id + 1} succeeded" in again.stderr


def test_regression_log_files_on_disk_reserve_their_ids_at_start(tmp_path):
    """A log left on disk by an earlier version (an app removed before logs were archived,
    above the highest id the registry still holds) is never a new deploy's log."""
    config = write_config(tmp_path / "gw", deploy={"command": ["cat", "env"]})
    server = ServerThread(config).start()
    try:
        admin = Admin(config)
        carol = person(server, tmp_path, "carol")
        admin.ok("app", "create", "web", "--owner", carol.name)
        assert push_env(carol, "web", "one\n", tmp_path / "work").returncode == 0
    finally:
        server.stop()
    log_dir = server.config.deploy.log_dir
    (log_dir / "40.log").write_text(f"{SECRET}\n")
    server = ServerThread(config).start()
    try:
        carol = Client(tmp_path / "home-again", carol.key, server, name=carol.name)  # new port
        result = push_env(carol, "web", "two\n", tmp_path / "work")
        assert result.returncode == 0 and "deploy #41 succeeded" in result.stderr
        assert (log_dir / "40.log").read_text() == f"{SECRET}\n"
    finally:
        server.stop()
