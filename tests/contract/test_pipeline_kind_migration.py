"""The migration that lets the registry record any pipeline kind (SQLite 0012, PostgreSQL
0006), applied to a registry the earlier migrations made, with rows in it: nothing is lost,
ids are not reused, and a kind the CHECK constraint did not list is stored."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.models import DeployStatus, NewDeploy
from gateway.store import open_store
from gateway.store import postgres as pg_backend
from gateway.store import sqlite as sqlite_backend

MIGRATION = "pipeline_kind_unchecked"
ROWS = [
    "INSERT INTO users (name, created_at) VALUES ('alice', '2026-01-01T00:00:00Z')",
    "INSERT INTO apps (name, owner_id, deploy_branch, created_at) "
    "SELECT 'web', id, 'main', '2026-01-01T00:00:00Z' FROM users",
    "INSERT INTO deploys (app_id, ref, old_sha, new_sha, pusher, key_fingerprint, mode, pipeline, "
    "status, created_at, note) SELECT id, 'refs/heads/main', '0', "
    "'a1', 'alice', 'SHA256:x', 'attached', 'command', 'cancelled', "
    "'2026-01-01T00:00:00Z', 'n' FROM apps",
    "INSERT INTO deploys (app_id, ref, old_sha, new_sha, pusher, key_fingerprint, mode, pipeline, "
    "status, created_at, note) SELECT id, 'refs/heads/main', '0', "
    "'a1', 'alice', 'SHA256:x', 'attached', 'webhook', 'succeeded', "
    "'2026-01-01T00:00:00Z', 'n' FROM apps",
    "INSERT INTO deploys (app_id, ref, old_sha, new_sha, pusher, key_fingerprint, mode, pipeline, "
    "status, created_at, note) SELECT id, 'refs/heads/main', '0', "
    "'a1', 'alice', 'SHA256:x', 'attached', 'command', 'failed', "
    "'2026-01-01T00:00:00Z', 'n' FROM apps",
    # The newest deploy deleted: its id must not come back after the rebuild.
    "DELETE FROM deploys WHERE id = (SELECT MAX(id) FROM deploys)",
    "UPDATE deploys SET superseded_by = (SELECT MAX(id) FROM deploys) "
    "WHERE id = (SELECT MIN(id) FROM deploys)",
    "INSERT INTO webhook_deliveries (deploy_id, attempt, url, status_code, duration_ms, "
    "created_at) SELECT MAX(id), 1, 'https://example.test/hook', 200, 5, "
    "'2026-01-01T00:00:00Z' FROM deploys",
    "INSERT INTO deploy_log_chunks (deploy_id, seq, position, size, text) "
    "SELECT MAX(id), 1, 0, 3, 'ok\n' FROM deploys",
]


def sqlite_before(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TEXT NOT NULL)"
        )
        for number, name, sql in sqlite_backend.migrations():
            if name == MIGRATION:
                break
            db.executescript(sql)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?, 'then')", (number, name))
        for statement in ROWS:
            db.execute(statement)


async def postgres_before(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for number, name, sql in pg_backend.migrations():
            if name == MIGRATION:
                break
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", number, name)
        for statement in ROWS:
            await conn.execute(statement)
    finally:
        await conn.close()


async def raw(kind: str, target: str, sql: str) -> list[tuple[object, ...]]:
    if kind == "sqlite":

        def read() -> list[tuple[object, ...]]:
            with sqlite3.connect(target) as db:
                return db.execute(sql).fetchall()

        return await asyncio.to_thread(read)
    import asyncpg

    conn = await asyncpg.connect(target)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_dropping_the_kind_check_keeps_rows_ids_and_children(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        target = str(tmp_path / "gw.db")
        sqlite_before(Path(target))
        migrations = sqlite_backend.migrations()
    else:
        target = request.getfixturevalue("pg_url")
        await postgres_before(target)
        migrations = pg_backend.migrations()
    names = [name for _, name, _ in migrations]
    # This one and every later migration are applied when the store opens.
    pending = len(names) - names.index(MIGRATION)
    query = "SELECT MIN(id), MAX(id), MAX(id) + 1 FROM deploys"
    first, kept, deleted = (await raw(kind, target, query))[0]
    store = await open_store(target)
    try:
        assert store.applied == pending and await store.schema_version() == len(migrations)
        old = await store.get_deploy(first)
        assert (old.pipeline, old.status, old.superseded_by, old.note) == (
            "command",
            DeployStatus.CANCELLED,
            kept,
            "n",
        )
        assert (await store.get_deploy(kept)).pipeline == "webhook"
        assert await store.get_deploy(deleted) is None
        assert [d.status_code for d in await store.webhook_deliveries(kept)] == [200]
        chunks = await raw(
            kind,
            target,
            "SELECT text FROM deploy_log_chunks WHERE deploy_id = (SELECT MAX(id) FROM deploys)",
        )
        assert chunks == [("ok\n",)]
        # A kind no constraint lists any more: the gateway's registry of kinds decides.
        queued = await store.queue_deploy(
            NewDeploy(
                old.app_id,
                "refs/heads/main",
                "0" * 40,
                "b" * 40,
                "alice",
                "SHA256:x",
                "s",
                "a",
                "attached",
                "podman",
            )
        )
        assert queued.deploy.pipeline == "podman" and queued.deploy.id > deleted
    finally:
        await store.close()
    if kind == "sqlite":
        indexes = {
            r[0]
            for r in await raw(
                kind,
                target,
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deploys'",
            )
        }
        assert {
            "deploys_by_app",
            "deploys_by_status",
            "deploys_one_running_per_app",
            "deploys_by_runner",
        } <= indexes
        assert await raw(kind, target, "PRAGMA foreign_key_check") == []
