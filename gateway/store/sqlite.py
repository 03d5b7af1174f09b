"""SQLite driver of the registry (aiosqlite, WAL, numbered migrations); its SQL is
gateway/store/sql/'s."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aiosqlite

from .. import times
from ..errors import StoreUnavailable
from . import packaged_migrations, utcnow
from .sql import SQLITE, ForeignKeyViolation, Row, SQLStore, UniqueViolation

# The statements, written once for both engines, read what they write with RETURNING.
MIN_VERSION = (3, 35, 0)

# Times are stored as text in the one form (times.text), which sorts as the times do.
sqlite3.register_adapter(datetime, times.text)


def _clock() -> float:
    """The leases' clock: seconds since the machine booted, the same for every process of
    the machine (a SQLite registry is never shared across machines) and never stepped by
    a wall-clock change."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def too_old() -> str | None:
    """Why the SQLite this Python links cannot hold the registry, if it cannot."""
    if sqlite3.sqlite_version_info >= MIN_VERSION:
        return None
    needed = ".".join(map(str, MIN_VERSION))
    return f"SQLite {sqlite3.sqlite_version} is too old for the registry ({needed} or newer)"


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every SQLite migration, in order."""
    return packaged_migrations("gateway.store")


def _mapping(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


@contextlib.contextmanager
def _constraints() -> Any:
    """sqlite3's IntegrityError as the engine-neutral violation it is."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        text = str(exc)
        if text.startswith("UNIQUE"):
            raise UniqueViolation(text) from exc
        if text.startswith("FOREIGN KEY"):
            raise ForeignKeyViolation(text) from exc
        raise


class SQLiteStore(SQLStore):
    """One aiosqlite connection; write transactions are serialized by a lock, because
    statements from concurrent coroutines on one connection would otherwise join them."""

    dialect = SQLITE

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        super().__init__()
        self._db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        self._writer: asyncio.Task[Any] | None = None  # the task inside a transaction
        self.applied = 0  # migrations this store applied when it opened
        self._depth = 0  # savepoints open inside the current transaction

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        if reason := too_old():
            raise StoreUnavailable(f"registry unusable: sqlite {path}: {reason}")
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            # typeshed wants a class; sqlite3 takes any callable of (cursor, row).
            db.row_factory = _mapping  # type: ignore[assignment]
            await db.create_function("gateway_clock", 0, _clock)
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute("PRAGMA foreign_keys = ON")
            store = cls(db, path)
            await store.migrate()
        except BaseException:
            await db.close()
            raise
        # The registry holds every account's keys: readable by the service user only.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(path.chmod, 0o600)
        return store

    async def close(self) -> None:
        await self._db.close()

    # -- statements --

    def _mine(self) -> bool:
        return self._writer is not None and self._writer is asyncio.current_task()

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a statement to its end in one step on the connection's thread. Outside this
        task's own transaction it waits for any other task's: on one connection a read would
        otherwise see another task's uncommitted writes, and a statement left open across
        an await holds an old snapshot that makes the next BEGIN IMMEDIATE fail at once
        ("database is locked") when another process has written meanwhile."""
        text = self.dialect.sql(sql)
        if self._mine():
            with _constraints():
                found = await self._db.execute_fetchall(text, args)
        else:
            async with self._write_lock, self._reachable():
                with _constraints():
                    found = await self._db.execute_fetchall(text, args)
        return cast(list[Row], list(found))  # rows made by _mapping

    async def execute(self, sql: str, *args: Any) -> int:
        if not self._mine():
            async with self._transaction():
                return await self.execute(sql, *args)
        with _constraints():
            cursor = await self._db.execute(self.dialect.sql(sql), args)
        return cursor.rowcount

    # -- transactions --

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction()  # type: ignore[return-value]

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._mine():
            # Inside this task's own transaction: a savepoint, so that a failing inner step
            # undoes only its own changes.
            self._depth += 1
            savepoint = f"step_{self._depth}"
            try:
                await self._db.execute(f"SAVEPOINT {savepoint}")
                try:
                    yield self._db
                except BaseException:
                    await self._db.execute(f"ROLLBACK TO {savepoint}")
                    await self._db.execute(f"RELEASE {savepoint}")
                    raise
                await self._db.execute(f"RELEASE {savepoint}")
            finally:
                self._depth -= 1
            return
        async with self._write_lock, self._reachable():
            self._writer = asyncio.current_task()
            try:
                # IMMEDIATE takes the write lock up front, so concurrent processes (the server
                # and the admin CLI) queue on busy_timeout instead of failing on lock upgrade.
                await self._begin()
                try:
                    yield self._db
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")
            finally:
                self._writer = None

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """A registry locked by another process beyond busy_timeout (a peer stuck in a
        transaction, a long copy) is unavailable for now, as an outage is on PostgreSQL:
        callers retry, never treat it as a bug."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreUnavailable("the registry is locked by another process") from exc
            raise

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE, cancellation-safe: the statement runs on the connection's thread
        to its end even if the task waiting for it is cancelled, and a transaction left open
        would make every later BEGIN on this connection fail."""
        begin = asyncio.ensure_future(self._db.execute("BEGIN IMMEDIATE"))
        try:
            await asyncio.shield(begin)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await begin
                await self._db.execute("ROLLBACK")
            raise

    async def raise_id_mark(self, table: str, through: int) -> None:
        # AUTOINCREMENT's high-water mark lives in sqlite_sequence (one row per table, made
        # at the first insert); raising it is how ids up to `through` are never given.
        seq = await self.fetchval("SELECT seq FROM sqlite_sequence WHERE name = $1", table)
        if seq is None:
            await self.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ($1, $2)", table, through
            )
        elif int(seq) < through:
            await self.execute(
                "UPDATE sqlite_sequence SET seq = $1 WHERE name = $2", through, table
            )

    # -- schema --

    async def migrate(self) -> int:
        """Apply pending migrations, each in its own transaction; return the schema version.

        Foreign key enforcement is off while they run, as SQLite's procedure for rebuilding a
        table requires (with it on, dropping a parent table cascade-deletes its children's
        rows; the setting cannot change inside a transaction). Every foreign key is checked
        before each migration commits instead: a violation rolls it back.
        """
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        version = 0
        await self._db.execute("PRAGMA foreign_keys = OFF")
        try:
            for number, name, sql in migrations():
                async with self._transaction() as db:
                    done = await self.fetchrow(
                        "SELECT 1 AS done FROM schema_migrations WHERE version = $1", number
                    )
                    if not done:
                        # sqlite3's executescript() would COMMIT our transaction first, so run
                        # the statements one by one inside it.
                        for statement in _statements(sql):
                            await db.execute(statement)
                        broken = await db.execute_fetchall("PRAGMA foreign_key_check")
                        if broken:
                            found = [tuple(r.values()) for r in list(broken)[:5]]  # type: ignore[attr-defined]
                            raise RuntimeError(
                                f"migration {number:04d}_{name} breaks foreign keys: {found}"
                            )
                        await self.execute(
                            "INSERT INTO schema_migrations (version, name, applied_at) "
                            "VALUES ($1, $2, $3)",
                            number,
                            name,
                            self.dialect.time(utcnow()),
                        )
                        self.applied += 1
                version = number
        finally:
            await self._db.execute("PRAGMA foreign_keys = ON")
        return version

    # -- moving a registry out (git-gateway db copy) --

    async def snapshot(
        self, tables: Sequence[tuple[str, Sequence[str]]]
    ) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, int]]:
        """Every row of these tables (the named columns, in key order) and each table's id
        high-water mark (the highest id ever handed out), read in one transaction: a
        consistent copy even while the gateway writes."""
        found: dict[str, list[tuple[Any, ...]]] = {}
        marks: dict[str, int] = {}
        async with self._transaction():
            marked = await self.fetch("SELECT name, seq FROM sqlite_sequence")
            sequences = {r["name"]: r["seq"] for r in marked}
            for table, columns in tables:
                # Table and column names come from the code's own list, never from input.
                found[table] = await self.table_rows(table, columns)
                if columns[0] == "id":
                    # Only numbered ids have a mark (a node's id is its name).
                    ids = (r[0] for r in found[table] if isinstance(r[0], int))
                    highest = max(ids, default=0)
                    marks[table] = max(int(sequences.get(table) or 0), highest)
        return found, marks


def _statements(sql: str) -> list[str]:
    """Split a migration into statements, the way sqlite3 itself sees their ends (quotes and
    comments included)."""
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise ValueError(f"incomplete statement at the end of a migration: {buffer.strip()[:80]}")
    return statements
