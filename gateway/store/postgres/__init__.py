"""PostgreSQL driver of the registry (asyncpg pool, numbered migrations under a lock,
LISTEN/NOTIFY); its SQL is gateway/store/sql/'s."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ... import times
from ...dburl import redact
from ...errors import Conflict, GatewayError, StoreUnavailable
from ...logs import q
from .. import packaged_migrations
from ..sql import POSTGRES, ForeignKeyViolation, Row, SQLStore, UniqueViolation

log = logging.getLogger("gateway.store")

# One lock id for every gateway sharing a database: N nodes starting together queue on it
# and the first applies the migrations; the others find nothing left to do.
MIGRATION_LOCK = 0x67_6974_6761_7465  # "gitgate"
CONNECT_TIMEOUT = 5.0  # seconds to open one connection
ACQUIRE_TIMEOUT = 10.0  # seconds to wait for a free pooled connection
COMMAND_TIMEOUT = 30.0  # seconds one statement may run
POOL_MIN, POOL_MAX = 0, 10  # none kept open by force: no reconnect loop of its own in an outage
UNAVAILABLE_LOG_INTERVAL = 10.0  # seconds between two "unavailable" log lines
# Deploy changes are announced on this channel to every gateway listening (LISTEN/NOTIFY).
CHANNEL = "gateway_deploys"
LISTEN_RETRY = (0.5, 5.0)  # seconds before reconnecting the listener: first, at most
# One lock per node name around claims: its max_parallel is counted and taken atomically.
CLAIM_LOCK_SPACE = 0x6761_7465  # "gate"

# What a lost, refused or restarting server looks like through asyncpg. Anything else (a
# constraint, a bug) is not an outage and is not dressed up as one.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # 08xxx: connection failure, does not exist, rejected
    asyncpg.OperatorInterventionError,  # 57xxx: admin shutdown, starting up, crash
    asyncpg.InsufficientResourcesError,  # 53xxx: too many connections, disk full
    asyncpg.InterfaceError,  # a connection closed under the driver
)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every PostgreSQL migration, in order."""
    return packaged_migrations(__name__)


# -- times: aware datetimes in the interface, timestamptz here, text in a registry copy --


def to_time(value: datetime | str | None) -> datetime | None:
    """A time to store: an aware datetime, or its text (as a SQLite registry holds it)."""
    if value is None or isinstance(value, datetime):
        return value
    return times.parse(value)


def from_time(moment: datetime | None) -> str | None:
    """A stored time as text (what `db copy` compares with a SQLite registry)."""
    return None if moment is None else times.text(moment)


@contextlib.asynccontextmanager
async def _constraints() -> AsyncIterator[None]:
    """asyncpg's constraint errors as the engine-neutral violations they are."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise UniqueViolation(exc.constraint_name or str(exc)) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise ForeignKeyViolation(str(exc)) from exc


def _count(status: str) -> int:
    """Rows affected, from a command tag such as "DELETE 3" or "UPDATE 1" (0 for one that
    counts none, such as "LOCK TABLE")."""
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else 0


class PostgresStore(SQLStore):
    """A pool of asyncpg connections. Each change is one transaction on one connection;
    a reachability failure of any kind becomes StoreUnavailable, and the pool replaces
    closed connections by itself when the server is back."""

    dialect = POSTGRES

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        super().__init__()
        self._pool = pool
        # Marks this store's own notifications, which it announced already.
        self._me = secrets.token_hex(8)
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self.url = url
        self.applied = 0  # migrations this store applied when it opened
        self._last_unavailable_log = 0.0
        # The connection of the transaction the current task has open on this store.
        self._current: contextvars.ContextVar[asyncpg.Connection | None] = contextvars.ContextVar(
            f"registry_transaction_{id(self)}", default=None
        )
        self._unavailable_count = 0

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=POOL_MIN,
                max_size=POOL_MAX,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                # Idle connections are recycled, so one that a restart broke while nobody
                # used it is not kept for long.
                max_inactive_connection_lifetime=60.0,
                server_settings={"application_name": "git-gateway", "TimeZone": "UTC"},
            )
        except ValueError as exc:  # asyncpg's URL parser
            raise StoreUnavailable(f"invalid registry URL {redact(url)}: {exc}") from None
        store = cls(pool, url)
        try:
            try:
                # The first connection, here, so that a wrong host, password or database
                # name is reported as such at start.
                async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                    await conn.execute("SELECT 1")
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(
                    f"cannot reach the registry at {redact(url)}: {_reason(exc)}"
                ) from None
            except asyncpg.PostgresError as exc:  # authentication, unknown database...
                raise StoreUnavailable(
                    f"the registry at {redact(url)} refused the connection: {_reason(exc)}"
                ) from None
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
        with contextlib.suppress(*_UNAVAILABLE):
            await self._pool.close()

    # -- hearing other gateways (LISTEN/NOTIFY) --

    @property
    def hears_others(self) -> bool:
        return self._listening

    async def start_listening(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        """Hold one connection of its own LISTENing; reconnect after an outage (callers
        poll meanwhile: hears_others is False)."""
        delay = LISTEN_RETRY[0]
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(
                    self.url,
                    timeout=CONNECT_TIMEOUT,
                    server_settings={"application_name": "git-gateway listener"},
                )
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(functools.partial(_settle, lost))
                await conn.add_listener(CHANNEL, self._heard)
                self._listening = True
                delay = LISTEN_RETRY[0]
                self._announce("queue")  # what happened while deaf: look again
                await lost
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: retry later
                log.debug("event=listener_down error=%s", q(_reason(exc)))
            finally:
                self._listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY[1])

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        text, _, sender = rest.partition(":")
        if sender == self._me or not text.isdigit():
            return
        self._announce(kind, int(text))

    async def notify(self, kind: str, deploy_id: int = 0) -> None:
        """Tell the other gateways, when this transaction commits."""
        await self.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{kind}:{deploy_id}:{self._me}")

    async def lock_claims(self, node_name: str) -> None:
        # The node's claims queue on its lock: its count cannot change under it.
        await self.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", CLAIM_LOCK_SPACE, node_name
        )

    async def raise_id_mark(self, table: str, through: int) -> None:
        # The identity's sequence only moves forward. Inserts are held off while it is read
        # and raised, so that no id handed out meanwhile could be handed out again.
        await self.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
        sequence = await self.fetchval("SELECT pg_get_serial_sequence($1, 'id') AS s", table)
        last = await self.fetchval("SELECT pg_sequence_last_value($1::regclass) AS v", sequence)
        if (last or 0) < through:
            await self.execute("SELECT setval($1::regclass, $2)", sequence, through)

    # -- plumbing --

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """Turn an outage into the one domain error; log the driver's words (throttled:
        during an outage every request would otherwise add a line)."""
        try:
            yield
        except _UNAVAILABLE as exc:
            self._unavailable_count += 1
            now = time.monotonic()
            if now - self._last_unavailable_log >= UNAVAILABLE_LOG_INTERVAL:
                log.warning(
                    "event=registry_unavailable failures=%d error=%s",
                    self._unavailable_count,
                    q(_reason(exc)),
                )
                self._last_unavailable_log = now
                self._unavailable_count = 0
            raise StoreUnavailable() from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        # What the caller's block raises passes through untouched (an OSError of its own is
        # no outage), though it still rolls the transaction back.
        try:
            async with self._transaction():
                try:
                    yield
                except BaseException as exc:
                    raise _Passthrough(exc) from exc
        except _Passthrough as wrapped:
            raise wrapped.error from None

    def _db(self) -> Any:
        """Where this task's statements go: its open transaction's connection, or the pool."""
        return self._current.get() or self._pool

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        conn = self._current.get()
        if conn is not None:
            # Inside this task's own transaction: asyncpg nests it as a savepoint, so that
            # a failing inner step undoes only its own changes.
            async with self._reachable(), conn.transaction():
                yield conn
            return
        async with (
            self._reachable(),
            self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn,
            conn.transaction(),
        ):
            token = self._current.set(conn)
            try:
                yield conn
            finally:
                self._current.reset(token)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._reachable(), _constraints():
            found = await self._db().fetch(self.dialect.sql(sql), *args, timeout=COMMAND_TIMEOUT)
        return list(found)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._reachable(), _constraints():
            tag = await self._db().execute(self.dialect.sql(sql), *args, timeout=COMMAND_TIMEOUT)
        return _count(tag)

    async def migrate(self) -> int:
        """Apply pending migrations, each in its own transaction, holding the database's
        migration lock (N gateways starting together migrate once); the schema version."""
        known = migrations()
        async with self._reachable(), self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            # Waits for whichever gateway migrates first; released with the connection
            # if this one dies halfway.
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK, timeout=None)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                    " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                newest = max(done, default=0)
                if newest > len(known):
                    raise GatewayError(
                        f"the registry's schema (version {newest}) is newer than this "
                        f"gateway's (version {len(known)}): upgrade this gateway"
                    )
                for number, name, sql in known:
                    if number in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            number,
                            name,
                        )
                    self.applied += 1
                    log.info("event=migrated backend=postgresql version=%d name=%s", number, name)
            finally:
                with contextlib.suppress(*_UNAVAILABLE):
                    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        return await self.schema_version()

    # -- moving a registry in (git-gateway db copy) --

    async def snapshot(
        self, tables: Sequence[tuple[str, Sequence[str]]], conn: Any = None
    ) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, int]]:
        """Every row of these tables (the named columns, in key order; times as interface
        strings) and each table's id high-water mark, read in one transaction."""
        if conn is None:
            async with self._transaction() as own:
                await own.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return await self.snapshot(tables, own)
        rows: dict[str, list[tuple[Any, ...]]] = {}
        marks: dict[str, int] = {}
        for table, columns in tables:
            # Table and column names come from the code's own list, never from input.
            # (self.fetch runs on `conn`: the transaction this task has open.)
            found = await self.table_rows(table, columns)
            rows[table] = [
                tuple(from_time(v) if isinstance(v, datetime) else v for v in r) for r in found
            ]
            if columns[0] == "id":
                marks[table] = int(
                    await conn.fetchval(
                        "SELECT COALESCE(pg_sequence_last_value("
                        "pg_get_serial_sequence($1, 'id')::regclass), 0)",
                        table,
                    )
                )
        return rows, marks

    async def load(
        self,
        tables: Sequence[tuple[str, Sequence[str], frozenset[str]]],
        rows: dict[str, list[tuple[Any, ...]]],
        marks: dict[str, int],
        verify: Callable[[dict[str, list[tuple[Any, ...]]], dict[str, int]], None],
    ) -> None:
        """Fill an empty registry with these rows (ids kept) in one transaction, raise each
        id sequence to its mark, then hand what the database now holds to `verify`, which
        may raise to roll it all back. Conflict if any table has a row already."""
        async with self._transaction() as conn:
            for table, _, _ in tables:
                # Taken before the check: nothing may slip in between it and the copy.
                await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):  # noqa: S608
                    raise Conflict(
                        f"the target registry is not empty (table {table} has rows): "
                        "db copy only fills an empty database"
                    )
            # Rows may point forward (a deploy superseded by a later one): every foreign
            # key is checked once, at commit.
            await conn.execute("SET CONSTRAINTS ALL DEFERRED")
            for table, columns, times in tables:
                positions = [i for i, c in enumerate(columns) if c in times]
                records = []
                for row in rows[table]:
                    values = list(row)
                    for i in positions:
                        try:
                            values[i] = to_time(values[i])
                        except (TypeError, ValueError):
                            raise ValueError(
                                f"{table} row {row[0]}: {columns[i]} {values[i]!r} is not a time"
                            ) from None
                    records.append(tuple(values))
                if records:
                    await conn.copy_records_to_table(table, records=records, columns=columns)
                mark = marks.get(table, 0)
                if mark > 0:
                    await conn.execute(
                        "SELECT setval(pg_get_serial_sequence($1, 'id'), $2)", table, mark
                    )
            copied, copied_marks = await self.snapshot([(t, c) for t, c, _ in tables], conn)
            verify(copied, copied_marks)


class _Passthrough(Exception):
    """Carries an exception of a caller's transaction block past the outage mapping."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _settle(future: asyncio.Future[None], *_: Any) -> None:
    if not future.done():
        future.set_result(None)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


__all__: Sequence[str] = ("PostgresStore", "from_time", "migrations", "to_time")
