"""What only the PostgreSQL backend has: migrations under a lock, its column types, clear
errors when the server cannot be reached, and recovery after a restart."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.errors import GatewayError, StoreUnavailable
from gateway.models import Home
from gateway.store import open_store, transfer
from gateway.store.postgres import PostgresStore, migrations
from tests import pg

UNAVAILABLE = "temporarily unavailable: the registry cannot be reached; try again shortly"


async def test_nodes_starting_together_migrate_exactly_once(postgres, pg_url) -> None:
    stores = await asyncio.gather(*(open_store(pg_url) for _ in range(6)))
    try:
        assert all(isinstance(s, PostgresStore) for s in stores)
        assert sum(s.applied for s in stores) == len(migrations())
        assert {await s.schema_version() for s in stores} == {len(migrations())}
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    database = pg_url.rsplit("/", 1)[1]
    rows = postgres.psql("SELECT version FROM schema_migrations ORDER BY 1", database)
    assert rows.split() == [str(v) for v, _, _ in migrations()]
    # A later start finds nothing to do.
    again = await open_store(pg_url)
    assert again.applied == 0
    await again.close()


async def test_ids_are_identities_and_times_are_timestamptz(postgres, pg_url) -> None:
    store = await open_store(pg_url)
    await store.create_user("alice")
    await store.close()
    database = pg_url.rsplit("/", 1)[1]
    types = postgres.psql(
        "SELECT table_name, column_name, data_type, is_identity FROM information_schema.columns"
        " WHERE table_schema = 'public' AND (column_name = 'id' OR data_type LIKE 'timestamp%'"
        " OR column_name IN ('at', 'created_at'))",
        database,
    ).splitlines()
    # A node's id is its own name (text), given by the process itself.
    ids = [t for t in types if "|id|" in t and not t.startswith(("schema_migrations", "nodes|"))]
    assert ids and all(t.endswith("|bigint|YES") for t in ids), ids
    assert "nodes|id|text|NO" in types
    times = {
        tuple(t.split("|")[:3])
        for t in types
        if "|id|" not in t and not t.startswith("schema_migrations")
    }
    expected = {
        (table, column, "timestamp with time zone")
        for table, _, columns in transfer.TABLES
        for column in columns
    }
    assert times == expected
    assert postgres.psql("SELECT created_at FROM users", database).strip().endswith("+00")


async def test_unreachable_server_is_one_line_without_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(StoreUnavailable) as err:
            await open_store(f"postgresql://gw:s3cret-pw@127.0.0.1:{port}/gateway")
    message = str(err.value)
    assert message.startswith(
        f"cannot reach the registry at postgresql://gw:********@127.0.0.1:{port}/gateway: "
    )
    assert "s3cret" not in message and "\n" not in message


async def test_a_refused_connection_says_why(postgres) -> None:
    with pytest.raises(StoreUnavailable, match=r"refused the connection: .*does not exist"):
        await open_store(postgres.url("no_such_database"))


async def test_a_schema_newer_than_the_code_is_refused(postgres, pg_url) -> None:
    store = await open_store(pg_url)
    await store.close()
    database = pg_url.rsplit("/", 1)[1]
    postgres.psql("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')", database)
    with pytest.raises(GatewayError, match=r"schema \(version 999\) is newer than this gateway"):
        await open_store(pg_url)


@pytest.fixture
def own_server():
    """A PostgreSQL server of this test's own, to stop and start."""
    server = pg.PostgresServer(pg.require_postgres())
    try:
        yield server.start()
    finally:
        server.remove()


async def test_regression_a_database_restart_is_unavailable_then_recovers(own_server) -> None:
    store = await open_store(own_server.create_database())
    try:
        await store.create_user("alice")
        await asyncio.to_thread(own_server.stop)
        for call in (store.ping(), store.get_user("alice"), store.create_user("bob")):
            with pytest.raises(StoreUnavailable) as err:
                await call
            assert str(err.value) == UNAVAILABLE
        await asyncio.to_thread(own_server.start)
        # The pool replaces its closed connections by itself: the next calls just work.
        await store.ping()
        assert (await store.get_user("alice")).name == "alice"
        assert (await store.create_user("bob")).name == "bob"
    finally:
        await store.close()


async def test_both_backends_have_the_same_tables_and_columns(postgres, pg_url, tmp_path) -> None:
    """A migration added to one backend only (or a table db copy does not know) fails here."""
    import sqlite3

    store = await open_store(tmp_path / "gw.db")
    await store.close()
    with sqlite3.connect(tmp_path / "gw.db") as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        lite = {
            (table, row[1])
            for table in names
            if table not in ("sqlite_sequence", "schema_migrations")
            for row in db.execute(f"PRAGMA table_info({table})")
        }
    store = await open_store(pg_url)
    await store.close()
    rows = postgres.psql(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'schema_migrations'",
        pg_url.rsplit("/", 1)[1],
    )
    assert {tuple(r.split("|")) for r in rows.splitlines()} == lite
    copied = {(table, column) for table, columns, _ in transfer.TABLES for column in columns}
    assert copied == lite


async def test_db_copy_keeps_each_apps_home(pg_url, tmp_path) -> None:
    """The home nodes (and the node rows they hang on) go over with `db copy`."""
    source = await open_store(tmp_path / "gw.db")
    target = await open_store(pg_url)
    try:
        await source.create_user("alice")
        web = (await source.create_app("web", "alice", "main")).id
        await source.create_app("api", "alice", "main")
        await source.register_node("node-a", "host-a", 1, "10.0.0.11:7422")
        home = await source.claim_home(web, "node-a")
        assert home == Home("node-a", "host-a", "10.0.0.11:7422")
        report = await transfer.copy_registry(source, target)
        assert report.source.rows["app_homes"] == report.target.rows["app_homes"] == 1
        assert await target.home_of(web) == home
        assert await target.homes_of("node-a") == [web]
    finally:
        await source.close()
        await target.close()
