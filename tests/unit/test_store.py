"""What only the SQLite backend has: its file, WAL, migrations from old schemas, locking.

The behaviour every backend shares is in tests/contract/test_store.py."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.keys import parse_public_key
from gateway.models import NewDeploy
from gateway.store import open_store
from gateway.store.sqlite import SQLiteStore, migrations
from tests.helpers import keygen


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
            INSERT INTO users VALUES (1, 'alice', '2026-01-01'), (2, 'bob', '2026-01-01'),
                (5, 'carol', '2026-01-01');
            INSERT INTO apps VALUES (1, 'web', 1, 'main', '2026-01-01'),
                (3, 'api', 2, 'prod', '2026-01-01');
            INSERT INTO app_members VALUES (1, 2, 'write', '2026-01-01'),
                (3, 5, 'read', '2026-01-01');
            INSERT INTO audit_events VALUES
                (1, '2026-01-01', 'login', 'alice', 'fp', '1.2.3.4', '', '{}'),
                (7, '2026-01-01', 'push', 'bob', 'fp', '', 'api', '{"updates": []}');
            INSERT INTO api_tokens VALUES (2, 'ops', NULL, 'h1', '2026-01-01', NULL),
                (4, 'alice-web', 1, 'h2', '2026-01-01', '2026-01-02');
            """
        )
        for i, text in enumerate(pubkeys[:2]):
            key = parse_public_key(text)
            db.execute(
                "INSERT INTO ssh_keys VALUES (?, ?, ?, ?, ?, ?, '', ?, ?, '2026-01-01', NULL)",
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
                "'webhook', ?, ?, 'tok', '2026-01-01')",
                (deploy_id, app_id, "0" * 40, SHA, status, superseded),
            )
        db.execute(
            "INSERT INTO webhook_deliveries VALUES "
            "(3, 6, 1, 'http://x', 500, 'boom', 12, '2026-01-01'), "
            "(4, 6, 2, 'http://x', 202, '', 8, '2026-01-01')"
        )


def columns(path: Path) -> dict[str, list[str]]:
    with sqlite3.connect(path) as db:
        return {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in TABLES}


def dump(path: Path, only: dict[str, list[str]] | None = None) -> dict[str, list[tuple]]:
    """Every row of the old tables (of the columns in `only`: later migrations add some)."""
    only = only or columns(path)
    with sqlite3.connect(path) as db:
        return {
            t: db.execute(f"SELECT {', '.join(only[t])} FROM {t} ORDER BY 1, 2").fetchall()  # noqa: S608
            for t in TABLES
        }


def indexes(path: Path) -> set[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
        return set(rows.fetchall())


async def test_regression_migration_keeps_every_row_and_stops_id_reuse(tmp_path, pubkeys):
    path = tmp_path / "gw.db"
    old_database(path, pubkeys)
    before, before_indexes, before_columns = dump(path), indexes(path), columns(path)
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
        assert dump(path, before_columns) == before
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


async def test_regression_a_sqlite_too_old_for_the_registry_is_one_clear_line(
    tmp_path, monkeypatch
):
    """The statements read what they write with RETURNING (SQLite 3.35): an older library
    is refused by name, at start and by `check`, before anything is created."""
    from gateway.errors import StoreUnavailable
    from gateway.store.probe import probe

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    path = tmp_path / "gw.db"
    for attempt in (open_store(path), probe(path)):
        with pytest.raises(StoreUnavailable) as err:
            await attempt
        assert str(err.value) == (
            f"registry unusable: sqlite {path}: "
            "SQLite 3.34.1 is too old for the registry (3.35.0 or newer)"
        )
    assert not path.exists()
