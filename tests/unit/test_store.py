"""The SQLite registry behind the Store interface: migrations, constraints, roles."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.errors import Conflict, KeyInUse, NotFound
from gateway.keys import parse_public_key
from gateway.models import Role
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
