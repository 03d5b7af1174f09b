"""The SQLite registry behind the Store interface: migrations, constraints, roles."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.errors import Conflict, KeyInUse, NotFound
from gateway.keys import parse_public_key
from gateway.models import AuditEvent, NewDeploy, Role
from gateway.store import open_store
from gateway.store.sqlite import SQLiteStore, migrations
from tests.helpers import keygen


@pytest.fixture
async def store(tmp_path: Path):
    s = await open_store(tmp_path / "db" / "gw.db")
    yield s
    await s.close()


@pytest.fixture(scope="module")
def pubkeys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("storekeys")
    return [Path(f"{keygen(d / f'k{i}', 'ed25519')}.pub").read_text() for i in range(3)]


async def test_wal_mode_migrations_and_permissions(tmp_path):
    path = tmp_path / "gw.db"
    store = await open_store(path)
    assert isinstance(store, SQLiteStore)
    assert await store.schema_version() == len(migrations())
    await store.close()
    # Reopening applies nothing twice.
    store = await open_store(path)
    assert await store.schema_version() == len(migrations())
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(
            migrations()
        )
    assert path.stat().st_mode & 0o077 == 0


async def test_users(store):
    await store.create_user("alice")
    with pytest.raises(Conflict):
        await store.create_user("alice")
    assert [u.user.name for u in await store.list_users()] == ["alice"]
    await store.remove_user("alice")
    with pytest.raises(NotFound):
        await store.get_user("alice")


async def test_one_key_one_account(store, pubkeys):
    await store.create_user("alice")
    await store.create_user("bob")
    key = parse_public_key(pubkeys[0])
    record = await store.add_key("alice", "laptop", key)
    assert record.fingerprint == key.fingerprint and record.last_used_at is None
    with pytest.raises(KeyInUse) as err:
        await store.add_key("bob", "laptop", key)
    assert str(err.value) == "this SSH key is already used by another account"
    with pytest.raises(Conflict, match="under the name 'laptop'"):
        await store.add_key("alice", "desktop", key)
    with pytest.raises(Conflict, match="already has a key named"):
        await store.add_key("alice", "laptop", parse_public_key(pubkeys[1]))
    await store.add_key("alice", "desktop", parse_public_key(pubkeys[1]))
    assert [k.name for k in await store.list_keys("alice")] == ["desktop", "laptop"]
    assert await store.list_keys("bob") == []
    found = await store.find_key(key.fingerprint)
    assert found is not None and found.user_name == "alice"
    await store.touch_key(found.id, "2026-01-01T00:00:00Z")
    assert (await store.find_key(key.fingerprint)).last_used_at == "2026-01-01T00:00:00Z"
    await store.remove_key("alice", "laptop")
    assert await store.find_key(key.fingerprint) is None
    with pytest.raises(NotFound):
        await store.remove_key("alice", "laptop")


async def test_apps_roles_and_owner_rules(store, pubkeys):
    for name in ("alice", "bob", "carol"):
        await store.create_user(name)
    app = await store.create_app("web", "alice", "main")
    with pytest.raises(Conflict):
        await store.create_app("web", "bob", "main")
    with pytest.raises(NotFound):
        await store.create_app("api", "nobody", "main")
    alice, bob, carol = [await store.get_user(n) for n in ("alice", "bob", "carol")]
    assert await store.role_on(app.id, alice.id) is Role.OWNER
    assert await store.role_on(app.id, bob.id) is None
    assert await store.grant("web", "bob", Role.READ) is None
    assert await store.grant("web", "bob", Role.WRITE) is Role.READ
    assert await store.role_on(app.id, bob.id) is Role.WRITE
    with pytest.raises(Conflict):
        await store.grant("web", "alice", Role.READ)
    assert [(m.user_name, m.role) for m in await store.list_members("web")] == [
        ("alice", Role.OWNER),
        ("bob", Role.WRITE),
    ]
    assert [(a.name, r) for a, r in await store.apps_for(bob.id)] == [("web", Role.WRITE)]
    assert await store.apps_for(carol.id) == []
    with pytest.raises(Conflict, match="owns apps"):
        await store.remove_user("alice")
    assert await store.revoke("web", "bob") is Role.WRITE
    with pytest.raises(NotFound):
        await store.revoke("web", "bob")
    await store.grant("web", "carol", Role.ADMIN)
    await store.remove_user("carol")  # memberships go with the user
    assert [m.user_name for m in await store.list_members("web")] == ["alice"]
    await store.remove_app("web")
    assert await store.get_app("web") is None
    await store.remove_user("alice")


async def test_concurrent_writers_on_one_connection(store):
    # Transactions from concurrent coroutines must not interleave on the shared connection.
    import asyncio

    await asyncio.gather(*(store.create_user(f"user{i}") for i in range(30)))
    assert len(await store.list_users()) == 30


async def test_postgres_url_is_a_clear_config_error():
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="PostgreSQL"):
        await open_store("postgresql://db/gateway")


# -- ids are never reused (migration 0005) --

TABLES = (
    "users",
    "ssh_keys",
    "apps",
    "app_members",
    "deploys",
    "webhook_deliveries",
    "audit_events",
    "api_tokens",
)
SHA = "a" * 40


def new_deploy(app_id: int) -> NewDeploy:
    return NewDeploy(app_id, "refs/heads/main", "0" * 40, SHA, "alice", "SHA256:x", "s", "a",
                     "attached", "command")  # fmt: skip


def old_database(path: Path, pubkeys: list[str]) -> None:
    """A registry as migrations 0001-0004 left it, with rows in every table."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TEXT NOT NULL)"
        )
        for number, name, sql in migrations()[:4]:
            db.executescript(sql)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?, 'then')", (number, name))
        db.executescript(
            """
            INSERT INTO users VALUES (1, 'alice', 't'), (2, 'bob', 't'), (5, 'carol', 't');
            INSERT INTO apps VALUES (1, 'web', 1, 'main', 't'), (3, 'api', 2, 'prod', 't');
            INSERT INTO app_members VALUES (1, 2, 'write', 't'), (3, 5, 'read', 't');
            INSERT INTO audit_events VALUES (1, 't', 'login', 'alice', 'fp', '1.2.3.4', '', '{}'),
                (7, 't', 'push', 'bob', 'fp', '', 'api', '{"updates": []}');
            INSERT INTO api_tokens VALUES (2, 'ops', NULL, 'h1', 't', NULL),
                (4, 'alice-web', 1, 'h2', 't', 'u');
            """
        )
        for i, text in enumerate(pubkeys[:2]):
            key = parse_public_key(text)
            db.execute(
                "INSERT INTO ssh_keys VALUES (?, ?, ?, ?, ?, ?, '', ?, ?, 't', NULL)",
                (10 + i, 1 + i, f"k{i}", key.algorithm, key.bits, key.openssh, key.fingerprint,
                 key.fingerprint_md5),
            )  # fmt: skip
        for deploy_id, app_id, status, superseded in (
            (1, 1, "cancelled", 2),
            (2, 1, "succeeded", None),
            (6, 3, "failed", None),
        ):
            db.execute(
                "INSERT INTO deploys (id, app_id, ref, old_sha, new_sha, pusher, "
                "key_fingerprint, mode, pipeline, status, superseded_by, status_token_hash, "
                "created_at) VALUES (?, ?, 'refs/heads/main', ?, ?, 'alice', 'fp', 'attached', "
                "'webhook', ?, ?, 'tok', 't')",
                (deploy_id, app_id, "0" * 40, SHA, status, superseded),
            )
        db.execute(
            "INSERT INTO webhook_deliveries VALUES (3, 6, 1, 'http://x', 500, 'boom', 12, 't'), "
            "(4, 6, 2, 'http://x', 202, '', 8, 't')"
        )


def dump(path: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(path) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}  # noqa: S608


def indexes(path: Path) -> set[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
        return set(rows.fetchall())


async def test_regression_migration_keeps_every_row_and_stops_id_reuse(tmp_path, pubkeys):
    path = tmp_path / "gw.db"
    old_database(path, pubkeys)
    before, before_indexes = dump(path), indexes(path)
    store = await open_store(path)
    try:
        assert await store.schema_version() == len(migrations())
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("PRAGMA foreign_key_check").fetchall() == []
            sequence = dict(db.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
            for table in set(TABLES) - {"app_members"}:
                sql = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,))
                assert "AUTOINCREMENT" in sql.fetchone()[0], table
        assert dump(path) == before
        # Every index kept; later migrations only add theirs.
        assert before_indexes <= indexes(path)
        assert sequence == {
            "users": 5,
            "ssh_keys": 11,
            "apps": 3,
            "deploys": 6,
            "webhook_deliveries": 4,
            "audit_events": 7,
            "api_tokens": 4,
        }
        # The store's own connection enforces foreign keys again: cascades still work.
        await store.remove_app("api")
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT COUNT(*) FROM webhook_deliveries").fetchone() == (0,)
        # The newest deploy (6) went with its app: the next one does not get 6 again.
        assert (await store.create_deploy(new_deploy(1))).id == 7
        found = await store.get_deploy(2)
        assert found is not None and found.app_name == "web" and found.superseded_by is None
        assert (await store.get_deploy(1)).superseded_by == 2
    finally:
        await store.close()


async def test_regression_ids_are_never_reused_after_deleting_the_newest(store, pubkeys):
    await store.create_user("alice")
    await store.create_user("bob")
    bob = await store.get_user("bob")
    await store.remove_user("bob")
    assert (await store.create_user("bob")).id > bob.id
    key = await store.add_key("alice", "k", parse_public_key(pubkeys[0]))
    await store.remove_key("alice", "k")
    assert (await store.add_key("alice", "k", parse_public_key(pubkeys[0]))).id > key.id
    web = await store.create_app("web", "alice", "main")
    deploy = await store.create_deploy(new_deploy(web.id))
    assert await store.app_deploy_ids("web") == [deploy.id]
    await store.remove_app("web")
    again = await store.create_app("web", "alice", "main")
    assert again.id > web.id
    assert (await store.create_deploy(new_deploy(again.id))).id > deploy.id
    token = await store.create_token("t", None, "hash1")
    await store.remove_token("t")
    assert (await store.create_token("t", None, "hash2")).id > token.id
    # Audit events are never deleted by the gateway; an operator pruning the newest by hand
    # does not bring its id back either.
    await store.add_audit(AuditEvent("one"))
    newest = (await store.list_audit(limit=1))[0]
    with sqlite3.connect(store.path) as db:
        db.execute("DELETE FROM audit_events WHERE id = ?", (newest.id,))
    await store.add_audit(AuditEvent("two"))
    assert (await store.list_audit(limit=1))[0].id > newest.id


async def test_reserve_deploy_ids(store):
    await store.create_user("alice")
    app = await store.create_app("web", "alice", "main")
    await store.reserve_deploy_ids(41)  # no deploy yet: no sqlite_sequence row either
    assert (await store.create_deploy(new_deploy(app.id))).id == 42
    await store.reserve_deploy_ids(10)  # never lowers it
    assert (await store.create_deploy(new_deploy(app.id))).id == 43
    await store.reserve_deploy_ids(99)
    assert (await store.create_deploy(new_deploy(app.id))).id == 100


async def test_a_migration_breaking_a_foreign_key_is_rolled_back(tmp_path, monkeypatch):
    from gateway.store import sqlite as backend

    bad = "INSERT INTO app_members VALUES (99, 99, 'read', 't');"
    found = backend.migrations()
    monkeypatch.setattr(backend, "migrations", lambda: [*found, (len(found) + 1, "bad", bad)])
    with pytest.raises(RuntimeError, match="breaks foreign keys"):
        await open_store(tmp_path / "gw.db")
    with sqlite3.connect(tmp_path / "gw.db") as db:
        assert db.execute("SELECT COUNT(*) FROM app_members").fetchone() == (0,)
        assert db.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (len(found),)


async def test_regression_reads_never_leave_a_stale_snapshot_behind(tmp_path):
    """Concurrent reads and writes on the server's connection while another process (the
    admin CLI) writes: no "database is locked" from a read statement left open across an
    await (its old snapshot made the next BEGIN IMMEDIATE fail without waiting)."""
    import threading

    path = tmp_path / "gw.db"
    store = await open_store(path)
    stop = threading.Event()

    def other_process() -> None:
        with sqlite3.connect(path, timeout=10, isolation_level=None) as db:
            number = 0
            while not stop.is_set():
                number += 1
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO users (name, created_at) VALUES (?, '2026-01-01T00:00:00Z')",
                    (f"cli{number}",),
                )
                db.execute("COMMIT")
                stop.wait(0.002)  # a busy CLI, not a tight loop that starves everyone

    writer = threading.Thread(target=other_process)
    writer.start()
    try:

        async def server_work(index: int) -> None:
            for round_ in range(20):
                await store.list_users()
                await store.create_user(f"srv{index}x{round_}")
                await store.get_user(f"srv{index}x{round_}")

        await asyncio.wait_for(asyncio.gather(*(server_work(i) for i in range(10))), 60)
    finally:
        stop.set()
        writer.join(30)
        await store.close()
    assert sum(1 for u in await _users(path) if u.startswith("srv")) == 200


async def _users(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT name FROM users")]
