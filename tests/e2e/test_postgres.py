"""A gateway on PostgreSQL: an existing SQLite installation moved over with `db copy`
(nothing lost, real clones with keys registered before), `db migrate`, and a database
outage (one clear line, open connections survive, /readyz 503, recovery on its own)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import asyncssh
import pytest

from gateway.models import DeployStatus, NewDeploy, WebhookDelivery
from gateway.store.postgres import migrations as postgres_migrations
from tests import pg
from tests.helpers import Admin, Client, ServerThread, http, http_base, ssh_connect, write_config

UNAVAILABLE = "temporarily unavailable: the registry cannot be reached; try again shortly"


def listing(admin: Admin) -> dict[str, object]:
    """What an operator sees of the registry, without what depends on the listener."""
    apps = json.loads(admin.ok("app", "list", "--json"))
    for app in apps:
        app.pop("clone_url", None)
    return {
        "users": json.loads(admin.ok("user", "list", "--json")),
        "keys": json.loads(admin.ok("key", "list", "alice", "--json")),
        "apps": apps,
        "members": json.loads(admin.ok("app", "members", "web", "--json")),
        "tokens": json.loads(admin.ok("token", "list", "--json")),
        "deploys": json.loads(admin.ok("deploy", "list", "web", "--json")),
    }


def sqlite_installation(tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """A SQLite gateway with users, keys, an app with members and a push, tokens, deploys
    (one superseded by a later one), webhook deliveries, audit events, and a removed user
    whose id must not come back. Returns its config, alice's key and the deploy ids."""
    state = tmp_path / "sqlite"
    config = write_config(state)
    server = ServerThread(config).start()
    try:
        admin = Admin(config)
        key = admin.enroll("alice", tmp_path, "web")
        admin.ok("user", "add", "bob")
        admin.ok("app", "grant", "web", "bob", "read")
        admin.ok("token", "create", "ops")
        admin.ok("token", "create", "alice-web", "--user", "alice")
        admin.ok("user", "add", "temp")
        admin.ok("user", "remove", "temp")  # the newest id, deleted: never to be reused
        alice = Client(tmp_path / "home-sqlite", key, server, name="alice")
        work = alice.new_repo(tmp_path / "work", {"README": "before the move\n"})
        alice.git("push", "-q", alice.url("web"), "main", cwd=work)
        store = server.gateway.store

        async def deploys() -> list[int]:
            app = await store.get_app("web")
            new = NewDeploy(app.id, "refs/heads/main", "0" * 40, "1" * 40, "alice", "SHA256:x",
                            "first", "Alice", "attached", "webhook")  # fmt: skip
            first, second = await store.create_deploy(new), await store.create_deploy(new)
            await store.finish_deploy(first.id, DeployStatus.CANCELLED, "2026-01-01T00:00:00Z",
                                      reason="superseded", superseded_by=second.id)  # fmt: skip
            await store.add_webhook_delivery(
                WebhookDelivery(first.id, 1, "http://hook/", 500, "boom", 7, "2026-01-01T00:00:01Z")
            )
            return [first.id, second.id]

        ids = server.call(deploys())
    finally:
        server.stop()
    return config, key, ids


def copy_counts(out: str) -> dict[str, tuple[int, int]]:
    counts = {}
    for line in out.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)\s+(\d+)\s+\S+", line.strip())
        if match:
            counts[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return counts


def test_db_copy_moves_a_sqlite_installation_with_nothing_lost(tmp_path, pg_url):
    config, key, (first, second) = sqlite_installation(tmp_path)
    admin = Admin(config)
    before = listing(admin)
    audit_before = json.loads(admin.ok("audit", "--limit", "1000", "--json"))

    out = admin.ok("db", "copy", "--to", pg_url)
    counts = copy_counts(out)
    assert counts["users"] == (2, 2) and counts["ssh_keys"] == (1, 1)
    assert counts["apps"] == (1, 1) and counts["app_members"] == (1, 1)
    assert counts["deploys"] == (2, 2) and counts["webhook_deliveries"] == (1, 1)
    assert counts["api_tokens"] == (2, 2)
    assert counts["audit_events"][0] == counts["audit_events"][1] == len(audit_before)
    sums = re.findall(r"checksum (sqlite|postgresql):\s+([0-9a-f]{64})", out)
    assert [s[0] for s in sums] == ["sqlite", "postgresql"] and sums[0][1] == sums[1][1]

    # Copying again would mix two registries: refused, nothing changed.
    code, _, err = admin("db", "copy", "--to", pg_url)
    assert code == 1 and "is not empty" in err and err.count("\n") == 1

    # The same installation, now on PostgreSQL: same repositories and host keys.
    sqlite_cfg = ServerThread(config).config
    pg_config = write_config(
        tmp_path / "pg",
        storage={"database": pg_url, "repos": str(sqlite_cfg.storage.repos)},
        ssh={"host_key_dir": str(sqlite_cfg.ssh.host_key_dir)},
    )
    pg_admin = Admin(pg_config)
    assert listing(pg_admin) == before
    assert json.loads(pg_admin.ok("audit", "--limit", "1000", "--json")) == audit_before
    server = ServerThread(pg_config).start()
    try:
        # A key registered before the move still clones, and pushes.
        alice = Client(tmp_path / "home-pg", key, server, name="alice")
        clone = tmp_path / "clone"
        alice.git("clone", "-q", alice.url("web"), str(clone))
        assert (clone / "README").read_text() == "before the move\n"
        alice.commit(clone, {"NEW": "after\n"}, "after the move")
        alice.git("push", "-q", "origin", "main", cwd=clone)
        store = server.gateway.store
        moved = server.call(store.get_deploy(first))
        assert moved.superseded_by == second and moved.reason == "superseded"
        assert len(server.call(store.webhook_deliveries(first))) == 1
        # Ids stay never reused: the removed user's id (3) is not handed out again.
        pg_admin.ok("user", "add", "carol")
        assert server.call(store.get_user("carol")).id == 4
    finally:
        server.stop()


def test_regression_db_copy_is_all_or_nothing(tmp_path, pg_url, postgres):
    state = tmp_path / "gw"
    config = write_config(state)
    admin = Admin(config)
    admin.ok("user", "add", "alice")
    admin.ok("user", "add", "bob")
    with sqlite3.connect(state / "gw.db") as db:  # an operator's hand edit
        db.execute("UPDATE users SET created_at = 'yesterday' WHERE name = 'bob'")
    code, out, err = admin("db", "copy", "--to", pg_url)
    assert code == 1 and out == ""
    assert err == "error: cannot copy: users row 2: created_at 'yesterday' is not a time; " \
        "nothing was written\n"  # fmt: skip
    database = pg_url.rsplit("/", 1)[1]
    assert postgres.psql("SELECT COUNT(*) FROM users", database).strip() == "0"
    with sqlite3.connect(state / "gw.db") as db:
        db.execute("UPDATE users SET created_at = '2026-01-01T00:00:00Z' WHERE name = 'bob'")
    assert "checksum postgresql" in admin.ok("db", "copy", "--to", pg_url)
    # Wrong directions are refused before anything is opened.
    code, _, err = admin("db", "copy", "--to", str(tmp_path / "other.db"))
    assert code == 2 and "needs a postgresql:// URL" in err
    code, _, err = admin("db", "copy", "--to", pg_url, "--from", pg_url)
    assert code == 2 and "reads a SQLite registry" in err


def test_db_migrate(tmp_path, pg_url, monkeypatch):
    config = write_config(tmp_path / "gw")
    admin = Admin(config)
    assert re.fullmatch(
        r"registry \S+gw\.db: schema version (\d+) \(\1 migrations applied now\)\n",
        admin.ok("db", "migrate"),
    )
    assert admin.ok("db", "migrate").endswith("(0 migrations applied now)\n")
    monkeypatch.setenv("GATEWAY_DATABASE_URL", pg_url)
    count = len(postgres_migrations())
    assert admin.ok("db", "migrate") == f"registry {pg_url}: schema version {count} " \
        f"({count} migrations applied now)\n"  # fmt: skip
    assert admin.ok("db", "migrate").endswith("(0 migrations applied now)\n")


def keys_page(base: str, cookie: str) -> tuple[int, str]:
    request = urllib.request.Request(f"{base}/keys", headers={"Cookie": cookie})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def own_server():
    """A PostgreSQL server of this test's own, to stop and start."""
    server = pg.PostgresServer(pg.require_postgres())
    try:
        yield server.start()
    finally:
        server.remove()


async def test_regression_database_outage(tmp_path, own_server):
    config = write_config(tmp_path / "gw", storage={"database": own_server.create_database()})
    server = ServerThread(config)
    await asyncio.to_thread(server.start)
    try:
        admin = Admin(config)
        key = await asyncio.to_thread(admin.enroll, "alice", tmp_path, "web")
        base = http_base(server)
        async with ssh_connect(server.port, key) as conn:
            assert (await asyncio.wait_for(conn.run("info"), 30)).exit_status == 0
            await asyncio.to_thread(own_server.stop)
            # An open connection gets one clear line per command, and stays open.
            for _ in range(2):
                result = await asyncio.wait_for(conn.run("info"), 30)
                assert (result.exit_status, result.stdout) == (1, "")
                assert result.stderr == f"error: {UNAVAILABLE}\n"
            ready = await asyncio.to_thread(http, "GET", f"{base}/readyz")
            assert ready.status == 503
            assert ready.json()["checks"]["database"].startswith("unreachable: temporarily")
            # The API and the keys page too, with no traceback.
            api = await asyncio.to_thread(http, "GET", f"{base}/api/v1/apps", "ggw_" + "x" * 43)
            assert api.status == 503
            assert api.json()["error"] == {"code": "unavailable", "message": UNAVAILABLE}
            page = await asyncio.to_thread(keys_page, base, "gw_session=abc")
            assert page == (503, f"{UNAVAILABLE}\n")
            # The CLI says the same in one line.
            code, _, err = await asyncio.to_thread(admin, "user", "list")
            assert code == 1 and err.startswith("error: cannot reach the registry at ")
            # A new SSH login is told why, instead of "Connection closed".
            with pytest.raises(asyncssh.DisconnectError, match="temporarily unavailable"):
                async with ssh_connect(server.port, key):
                    pass
            await asyncio.to_thread(own_server.start)
            # Back without a restart of the gateway, on the same connection.
            result = await asyncio.wait_for(conn.run("info"), 30)
            assert result.exit_status == 0, result.stderr
            assert "web" in result.stdout
        ready = await asyncio.to_thread(http, "GET", f"{base}/readyz")
        assert ready.status == 200
    finally:
        await asyncio.to_thread(server.stop)
