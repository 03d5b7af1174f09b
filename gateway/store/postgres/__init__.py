"""PostgreSQL backend of the registry (asyncpg pool, numbered migrations under a lock)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ... import times
from ...dburl import redact
from ...errors import Conflict, GatewayError, KeyInUse, KeyLimitReached, NotFound, StoreUnavailable
from ...keys import PublicKey
from ...logs import q
from ...models import (
    ApiToken,
    App,
    AuditEvent,
    Deploy,
    DeployStatus,
    LogChunk,
    Member,
    NewDeploy,
    Node,
    Role,
    SSHKey,
    User,
    WebhookDelivery,
)
from .. import (
    KeyOwner,
    Queued,
    Store,
    UserSummary,
    WebSession,
    key_name_taken,
    packaged_migrations,
    storable,
    utcnow,
)

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

_KEY_COLUMNS = """k.id, k.user_id, u.name, k.name, k.algorithm, k.bits, k.public_key, k.comment,
    k.fingerprint, k.fingerprint_md5, k.created_at, k.last_used_at, k.expires_at,
    k.app_id, ka.name, k.access, k.scoped,
    (SELECT string_agg(sa.name, chr(10)) FROM key_apps s JOIN apps sa ON sa.id = s.app_id
     WHERE s.key_id = k.id)"""
_KEY_FROM = """FROM ssh_keys k LEFT JOIN users u ON u.id = k.user_id
    LEFT JOIN apps ka ON ka.id = k.app_id"""
_APP_COLUMNS = "a.id, a.name, a.owner_id, u.name, a.deploy_branch, a.created_at"
_APP_FROM = "FROM apps a JOIN users u ON u.id = a.owner_id"
_DEPLOY_COLUMNS = """d.id, d.app_id, a.name, d.ref, d.old_sha, d.new_sha, d.pusher,
    d.key_fingerprint, d.subject, d.author, d.mode, d.pipeline, d.status, d.superseded_by,
    d.exit_code, d.reason, d.created_at, d.started_at, d.finished_at, d.runner, d.duration_ms,
    d.note"""
_DEPLOY_FROM = "FROM deploys d JOIN apps a ON a.id = d.app_id"
_TOKEN_COLUMNS = "t.id, t.name, t.user_id, u.name, t.created_at, t.last_used_at, t.expires_at"  # noqa: S105
_TOKEN_FROM = "FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id"  # noqa: S105
_OPEN = [DeployStatus.QUEUED.value, DeployStatus.RUNNING.value]
# Names sort byte by byte as on SQLite, whatever the database's locale.
_BYTES = 'COLLATE "C"'


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


def _t(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


def _user(row: Any) -> User:
    return User(row[0], row[1], _t(row[2]))  # type: ignore[arg-type]


def _key(row: Any) -> SSHKey:
    values = list(row)
    values[10], values[11], values[12] = _t(values[10]), _t(values[11]), _t(values[12])
    scoped, names = values[16], values[17]
    scope = tuple(sorted(names.split("\n"))) if scoped and names else () if scoped else None
    return SSHKey(*values[:16], scope=scope)


def _app(row: Any) -> App:
    return App(row[0], row[1], row[2], row[3], row[4], _t(row[5]))  # type: ignore[arg-type]


def _deploy(row: Any) -> Deploy:
    values = list(row)
    values[12] = DeployStatus(values[12])
    values[16:19] = [_t(v) for v in values[16:19]]
    if values[20] is not None:
        values[20] = int(values[20])
    return Deploy(*values)


def _token(row: Any) -> ApiToken:
    return ApiToken(*row[:4], _t(row[4]), _t(row[5]), _t(row[6]))  # type: ignore[arg-type]


def _count(status: str) -> int:
    """Rows affected, from a command tag such as "DELETE 3" or "UPDATE 1"."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore(Store):
    """A pool of asyncpg connections. Each change is one transaction on one connection;
    a reachability failure of any kind becomes StoreUnavailable, and the pool replaces
    closed connections by itself when the server is back."""

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

    async def _notify(self, conn: Any, kind: str, deploy_id: int = 0) -> None:
        """Tell the other gateways, when this transaction commits."""
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{kind}:{deploy_id}:{self._me}")

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

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        async with self._reachable():
            return list(await self._db().fetch(sql, *args, timeout=COMMAND_TIMEOUT))

    async def _one(self, sql: str, *args: Any) -> Any:
        async with self._reachable():
            return await self._db().fetchrow(sql, *args, timeout=COMMAND_TIMEOUT)

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
            found = await conn.fetch(f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1, 2")  # noqa: S608
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

    async def schema_version(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0])

    async def ping(self) -> None:
        await self._one("SELECT 1 FROM schema_migrations LIMIT 1")

    # -- users --

    async def _user_row(self, conn: Any, name: str) -> User:
        row = await conn.fetchrow("SELECT id, name, created_at FROM users WHERE name = $1", name)
        if row is None:
            raise NotFound(f"no such user '{name}'")
        return _user(row)

    async def create_user(self, name: str) -> User:
        try:
            async with self._transaction() as conn:
                row = await conn.fetchrow(
                    "INSERT INTO users (name, created_at) VALUES ($1, $2) "
                    "RETURNING id, name, created_at",
                    name,
                    to_time(utcnow()),
                )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"user '{name}' already exists") from None
        return _user(row)

    async def get_user(self, name: str) -> User:
        async with self._reachable():
            return await self._user_row(self._db(), name)

    async def list_users(self) -> list[UserSummary]:
        rows = await self._all(
            f"""SELECT u.id, u.name, u.created_at,
                      (SELECT COUNT(*) FROM ssh_keys k WHERE k.user_id = u.id),
                      (SELECT COUNT(*) FROM apps a WHERE a.owner_id = u.id)
                 FROM users u ORDER BY u.name {_BYTES}"""  # noqa: S608
        )
        return [UserSummary(_user(r[:3]), r[3], r[4]) for r in rows]

    async def remove_user(self, name: str) -> User:
        try:
            async with self._transaction() as conn:
                user = await self._user_row(conn, name)
                owned = await conn.fetch(
                    f"SELECT name FROM apps WHERE owner_id = $1 ORDER BY name {_BYTES}",  # noqa: S608
                    user.id,
                )
                if owned:
                    names = ", ".join(r[0] for r in owned)
                    raise Conflict(f"user '{name}' owns apps ({names}): remove them first")
                await conn.execute("DELETE FROM users WHERE id = $1", user.id)
        except asyncpg.ForeignKeyViolationError:  # an app created for them meanwhile
            raise Conflict(f"user '{name}' owns apps: remove them first") from None
        return user

    # -- keys --

    async def add_key(
        self,
        user_name: str,
        key_name: str,
        key: PublicKey,
        expires_at: datetime | None = None,
        *,
        access: str | None = None,
        scope: list[str] | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        async def add(conn: Any) -> int:
            user = await self._user_row(conn, user_name)
            owner = KeyOwner("user_id", user.id, user_name)
            apps = [await self._app_row(conn, name) for name in scope or []]
            key_id = await self._add(conn, owner, key, key_name, expires_at, access, scope, limit)
            for app in apps:
                await conn.execute(
                    "INSERT INTO key_apps (key_id, app_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    key_id,
                    app.id,
                )
            return key_id

        return await self._adding(add, key_name_taken(False, user_name, key_name))

    async def add_deploy_key(
        self,
        app_name: str,
        key_name: str,
        key: PublicKey,
        access: str,
        expires_at: datetime | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        async def add(conn: Any) -> int:
            app = await self._app_row(conn, app_name)
            owner = KeyOwner("app_id", app.id, app_name)
            return await self._add(conn, owner, key, key_name, expires_at, access, None, limit)

        return await self._adding(add, key_name_taken(True, app_name, key_name))

    async def _adding(self, add: Callable[[Any], Awaitable[int]], taken: Conflict) -> SSHKey:
        """Run `add` in a transaction and read the new key back; a unique violation (another
        transaction registered the key or the name between our check and our insert) gets
        the same refusal as the check would have given."""
        try:
            async with self._transaction() as conn:
                key_id = await add(conn)
                row = await conn.fetchrow(
                    f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.id = $1", key_id
                )
        except asyncpg.UniqueViolationError as exc:
            if "fingerprint" in (exc.constraint_name or ""):
                raise KeyInUse() from None
            raise taken from None
        return _key(row)

    async def _add(
        self,
        conn: Any,
        owner: KeyOwner,
        key: PublicKey,
        key_name: str,
        expires_at: datetime | None,
        access: str | None,
        scoped: list[str] | None,
        limit: int | None,
    ) -> int:
        if limit is not None:
            # The owner's row locked: concurrent adds for it count one by one.
            table = "apps" if owner.deploy else "users"
            await conn.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", owner.id)  # noqa: S608
            count = await conn.fetchval(
                f"SELECT count(*) FROM ssh_keys WHERE {owner.column} = $1",  # noqa: S608
                owner.id,
            )
            if count >= limit:
                raise KeyLimitReached(owner.name, limit, deploy=owner.deploy)
        existing = await conn.fetchrow(
            f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.fingerprint = $1", key.fingerprint
        )
        if existing is not None:
            owner.refuse(_key(existing))
        return await self._insert_key(
            conn,
            key,
            key_name,
            expires_at,
            **{owner.column: owner.id},
            access=access,
            scoped=scoped,
        )

    async def _insert_key(
        self,
        conn: Any,
        key: PublicKey,
        key_name: str,
        expires_at: datetime | None,
        *,
        user_id: int | None = None,
        app_id: int | None = None,
        access: str | None = None,
        scoped: list[str] | None = None,
    ) -> int:
        return int(
            await conn.fetchval(
                """INSERT INTO ssh_keys (user_id, app_id, name, algorithm, bits, public_key,
                       comment, fingerprint, fingerprint_md5, created_at, expires_at, access,
                       scoped)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                   RETURNING id""",
                user_id,
                app_id,
                key_name,
                key.algorithm,
                key.bits,
                key.openssh,
                key.comment,
                key.fingerprint,
                key.fingerprint_md5,
                to_time(utcnow()),
                None if expires_at is None else to_time(expires_at),
                access,
                int(scoped is not None),
            )
        )

    async def list_deploy_keys(self, app_name: str) -> list[SSHKey]:
        async with self._transaction() as conn:
            app = await self._app_row(conn, app_name)
            return await self._owned_keys(conn, KeyOwner("app_id", app.id, app_name))

    async def remove_deploy_key(self, app_name: str, key_name: str) -> SSHKey:
        async with self._transaction() as conn:
            app = await self._app_row(conn, app_name)
            return await self._remove_owned(conn, KeyOwner("app_id", app.id, app_name), key_name)

    async def list_keys(self, user_name: str) -> list[SSHKey]:
        async with self._transaction() as conn:
            user = await self._user_row(conn, user_name)
            return await self._owned_keys(conn, KeyOwner("user_id", user.id, user_name))

    async def remove_key(self, user_name: str, key_name: str) -> SSHKey:
        async with self._transaction() as conn:
            user = await self._user_row(conn, user_name)
            return await self._remove_owned(conn, KeyOwner("user_id", user.id, user_name), key_name)

    async def _owned_keys(self, conn: Any, owner: KeyOwner) -> list[SSHKey]:
        rows = await conn.fetch(
            f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.{owner.column} = $1 "
            f"ORDER BY k.name {_BYTES}",
            owner.id,
        )
        return [_key(r) for r in rows]

    async def _remove_owned(self, conn: Any, owner: KeyOwner, key_name: str) -> SSHKey:
        row = await conn.fetchrow(
            f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.{owner.column} = $1 AND k.name = $2 "
            "FOR UPDATE OF k",
            owner.id,
            key_name,
        )
        if row is None:
            raise owner.missing(key_name)
        await conn.execute("DELETE FROM ssh_keys WHERE id = $1", row[0])
        return _key(row)

    async def find_key(self, fingerprint: str) -> SSHKey | None:
        row = await self._one(
            f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.fingerprint = $1",
            fingerprint,
        )
        return None if row is None else _key(row)

    async def touch_key(self, key_id: int, when: datetime) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE ssh_keys SET last_used_at = $1 WHERE id = $2", to_time(when), key_id
            )

    # -- apps --

    async def _app_row(self, conn: Any, name: str) -> App:
        row = await conn.fetchrow(f"SELECT {_APP_COLUMNS} {_APP_FROM} WHERE a.name = $1", name)
        if row is None:
            raise NotFound(f"no such app '{name}'")
        return _app(row)

    async def create_app(self, name: str, owner_name: str, deploy_branch: str) -> App:
        try:
            async with self._transaction() as conn:
                owner = await self._user_row(conn, owner_name)
                await conn.execute(
                    "INSERT INTO apps (name, owner_id, deploy_branch, created_at) "
                    "VALUES ($1, $2, $3, $4)",
                    name,
                    owner.id,
                    deploy_branch,
                    to_time(utcnow()),
                )
                return await self._app_row(conn, name)
        except asyncpg.UniqueViolationError:
            raise Conflict(f"app '{name}' already exists") from None
        except asyncpg.ForeignKeyViolationError:  # the owner was removed meanwhile
            raise NotFound(f"no such user '{owner_name}'") from None

    async def get_app(self, name: str) -> App | None:
        row = await self._one(f"SELECT {_APP_COLUMNS} {_APP_FROM} WHERE a.name = $1", name)
        return None if row is None else _app(row)

    async def list_apps(self) -> list[App]:
        rows = await self._all(f"SELECT {_APP_COLUMNS} {_APP_FROM} ORDER BY a.name {_BYTES}")
        return [_app(r) for r in rows]

    async def remove_app(self, name: str) -> App:
        async with self._transaction() as conn:
            app = await self._app_row(conn, name)
            await conn.execute("DELETE FROM apps WHERE id = $1", app.id)
        return app

    async def grant(self, app_name: str, user_name: str, role: Role) -> Role | None:
        if role is Role.OWNER:
            raise ValueError("owner is not a grantable role")
        async with self._transaction() as conn:
            app = await self._app_row(conn, app_name)
            user = await self._user_row(conn, user_name)
            if user.id == app.owner_id:
                raise Conflict(f"'{user_name}' owns app '{app_name}' and already has every right")
            previous = await conn.fetchval(
                "SELECT role FROM app_members WHERE app_id = $1 AND user_id = $2 FOR UPDATE",
                app.id,
                user.id,
            )
            await conn.execute(
                """INSERT INTO app_members (app_id, user_id, role, created_at)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (app_id, user_id) DO UPDATE SET role = excluded.role""",
                app.id,
                user.id,
                role.label,
                to_time(utcnow()),
            )
        return None if previous is None else Role.parse(previous)

    async def revoke(self, app_name: str, user_name: str) -> Role:
        async with self._transaction() as conn:
            app = await self._app_row(conn, app_name)
            user = await self._user_row(conn, user_name)
            role = await conn.fetchval(
                "DELETE FROM app_members WHERE app_id = $1 AND user_id = $2 RETURNING role",
                app.id,
                user.id,
            )
            if role is None:
                if user.id == app.owner_id:
                    raise Conflict(
                        f"'{user_name}' owns app '{app_name}': ownership is not revocable"
                    )
                raise NotFound(f"'{user_name}' is not a member of app '{app_name}'")
        return Role.parse(role)

    async def list_members(self, app_name: str) -> list[Member]:
        async with self._reachable():
            app = await self._app_row(self._db(), app_name)
        rows = await self._all(
            f"""SELECT u.name, m.role, m.created_at FROM app_members m
                 JOIN users u ON u.id = m.user_id WHERE m.app_id = $1
                ORDER BY u.name {_BYTES}""",  # noqa: S608
            app.id,
        )
        owner = Member(app.owner_name, Role.OWNER, app.created_at)
        return [owner, *(Member(r[0], Role.parse(r[1]), _t(r[2])) for r in rows)]  # type: ignore[arg-type]

    async def role_on(self, app_id: int, user_id: int) -> Role | None:
        row = await self._one(
            """SELECT CASE WHEN a.owner_id = $1 THEN 'owner' ELSE m.role END
                 FROM apps a LEFT JOIN app_members m ON m.app_id = a.id AND m.user_id = $1
                WHERE a.id = $2""",
            user_id,
            app_id,
        )
        if row is None or row[0] is None:
            return None
        return Role.OWNER if row[0] == "owner" else Role.parse(row[0])

    async def apps_for(self, user_id: int) -> list[tuple[App, Role]]:
        rows = await self._all(
            f"""SELECT {_APP_COLUMNS}, CASE WHEN a.owner_id = $1 THEN 'owner' ELSE m.role END
                  {_APP_FROM}
                  LEFT JOIN app_members m ON m.app_id = a.id AND m.user_id = $1
                 WHERE a.owner_id = $1 OR m.user_id IS NOT NULL
                 ORDER BY a.name {_BYTES}""",
            user_id,
        )
        return [(_app(r[:6]), Role.OWNER if r[6] == "owner" else Role.parse(r[6])) for r in rows]

    # -- deploys --

    async def _insert_deploy(
        self, conn: Any, new: NewDeploy, now: datetime, origin: str | None
    ) -> int:
        return int(
            await conn.fetchval(
                """INSERT INTO deploys (app_id, ref, old_sha, new_sha, pusher, key_fingerprint,
                       subject, author, mode, pipeline, status, created_at, origin, note)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued', $11, $12, $13)
                   RETURNING id""",
                new.app_id,
                new.ref,
                new.old_sha,
                new.new_sha,
                new.pusher,
                new.key_fingerprint,
                new.subject,
                new.author,
                new.mode,
                new.pipeline,
                now,
                origin,
                new.note,
            )
        )

    async def create_deploy(self, new: NewDeploy) -> Deploy:
        async with self._transaction() as conn:
            deploy_id = await self._insert_deploy(conn, new, utcnow(), None)
            row = await conn.fetchrow(
                f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.id = $1",
                deploy_id,
            )
        return _deploy(row)

    async def get_deploy(self, deploy_id: int) -> Deploy | None:
        row = await self._one(f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.id = $1", deploy_id)
        return None if row is None else _deploy(row)

    async def list_deploys(self, app_name: str, limit: int = 20) -> list[Deploy]:
        async with self._reachable():
            app = await self._app_row(self._db(), app_name)
        rows = await self._all(
            f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.app_id = $1 "
            "ORDER BY d.id DESC LIMIT $2",
            app.id,
            limit,
        )
        return [_deploy(r) for r in rows]

    async def app_deploy_ids(self, app_name: str) -> list[int]:
        async with self._reachable():
            app = await self._app_row(self._db(), app_name)
        rows = await self._all("SELECT id FROM deploys WHERE app_id = $1 ORDER BY id", app.id)
        return [int(r[0]) for r in rows]

    async def reserve_deploy_ids(self, through: int) -> None:
        # The identity's sequence only moves forward. Inserts are held off while it is read
        # and raised, so that no id handed out meanwhile could be handed out again.
        async with self._transaction() as conn:
            await conn.execute("LOCK TABLE deploys IN SHARE ROW EXCLUSIVE MODE")
            sequence = await conn.fetchval("SELECT pg_get_serial_sequence('deploys', 'id')")
            last = await conn.fetchval("SELECT pg_sequence_last_value($1::regclass)", sequence)
            if (last or 0) < through:
                await conn.execute("SELECT setval($1::regclass, $2)", sequence, through)

    async def deploys_in(self, statuses: tuple[DeployStatus, ...]) -> list[Deploy]:
        rows = await self._all(
            f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} "
            "WHERE d.status = ANY($1::text[]) ORDER BY d.id",
            [s.value for s in statuses],
        )
        return [_deploy(r) for r in rows]

    async def start_deploy(self, deploy_id: int, when: datetime) -> bool:
        async with self._transaction() as conn:
            status = await conn.execute(
                "UPDATE deploys SET status = 'running', started_at = $1 "
                "WHERE id = $2 AND status = 'queued'",
                to_time(when),
                deploy_id,
            )
        return _count(status) == 1

    async def finish_deploy(
        self,
        deploy_id: int,
        status: DeployStatus,
        when: datetime,
        *,
        exit_code: int | None = None,
        reason: str = "",
        superseded_by: int | None = None,
        duration_ms: int | None = None,
    ) -> bool:
        if not status.finished:
            raise ValueError(f"{status} is not a final status")
        async with self._transaction() as conn:
            tag = await conn.execute(
                """UPDATE deploys SET status = $1, finished_at = $2, exit_code = $3, reason = $4,
                       superseded_by = $5, duration_ms = $6, cancel_request = NULL
                   WHERE id = $7 AND status = ANY($8::text[])""",
                status.value,
                to_time(when),
                exit_code,
                reason,
                superseded_by,
                duration_ms,
                deploy_id,
                _OPEN,
            )
            done = _count(tag) == 1
            if done:
                await self._notify(conn, "done", deploy_id)
        if done:
            self._announce("done", deploy_id)
        return done

    # -- the shared queue --

    async def queue_deploy(self, new: NewDeploy, *, origin: str | None = None) -> Queued:
        async with self._transaction() as conn:
            now = utcnow()
            deploy_id = await self._insert_deploy(conn, new, now, origin)
            # Rows locked: a claim cannot take one of these while it is being superseded.
            rows = await conn.fetch(
                """UPDATE deploys SET status = 'cancelled', finished_at = $1, reason = $2,
                       superseded_by = $3
                   WHERE app_id = $4 AND status = 'queued' AND id < $3
                   RETURNING id""",
                now,
                f"superseded by #{deploy_id}",
                deploy_id,
                new.app_id,
            )
            superseded = sorted(int(r[0]) for r in rows)
            for older in superseded:
                await self._notify(conn, "done", older)
            await self._notify(conn, "queue", deploy_id)
            row = await conn.fetchrow(
                f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.id = $1", deploy_id
            )
        for older in superseded:
            self._announce("done", older)
        self._announce("queue", deploy_id)
        return Queued(_deploy(row), superseded)

    async def queue_stats(self) -> tuple[int, datetime | None]:
        row = await self._one(
            "SELECT COUNT(*), MIN(created_at) FROM deploys WHERE status = 'queued'"
        )
        return int(row[0]), _t(row[1])

    async def claim_deploy(
        self,
        node: str,
        node_name: str,
        max_parallel: int,
        only: Sequence[int] | None = None,
    ) -> Deploy | None:
        # Idle gateways look often: a plain read first, the node's lock only when there is work.
        if await self._one("SELECT 1 FROM deploys WHERE status = 'queued' LIMIT 1") is None:
            return None
        try:
            async with self._transaction() as conn:
                # The node's claims queue on its lock: its count cannot change under it.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))", CLAIM_LOCK_SPACE, node_name
                )
                if not await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM nodes WHERE id = $1)", node
                ):
                    return None  # declared gone: it runs nothing until it has joined again
                busy = await conn.fetchval(
                    "SELECT COUNT(*) FROM deploys d JOIN nodes n ON n.id = d.runner "
                    "WHERE d.status = 'running' AND n.name = $1",
                    node_name,
                )
                if busy >= max_parallel:
                    return None
                # Other nodes skip what one of them is taking; the unique index on running
                # deploys per app settles two claims of one app's deploys.
                deploy_id = await conn.fetchval(
                    """SELECT d.id FROM deploys d
                        WHERE d.status = 'queued' AND (d.mode <> 'gate' OR d.origin = $1)
                          AND ($2::bigint[] IS NULL OR d.id = ANY($2::bigint[]))
                          AND NOT EXISTS (SELECT 1 FROM deploys r
                                           WHERE r.app_id = d.app_id AND r.status = 'running')
                        ORDER BY d.id LIMIT 1
                        FOR UPDATE OF d SKIP LOCKED""",
                    node,
                    None if only is None else list(only),
                )
                if deploy_id is None:
                    return None
                await conn.execute(
                    "UPDATE deploys SET status = 'running', started_at = $1, runner = $2 "
                    "WHERE id = $3",
                    to_time(utcnow()),
                    node,
                    deploy_id,
                )
                row = await conn.fetchrow(
                    f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.id = $1", deploy_id
                )
        except asyncpg.UniqueViolationError:
            return None  # another node started one of this app's deploys first
        return _deploy(row)

    async def request_cancel(self, deploy_id: int, reason: str) -> Deploy | None:
        kind = ""
        async with self._transaction() as conn:
            tag = await conn.execute(
                "UPDATE deploys SET status = 'cancelled', finished_at = $1, reason = $2 "
                "WHERE id = $3 AND status = 'queued'",
                to_time(utcnow()),
                reason,
                deploy_id,
            )
            if _count(tag):
                kind = "done"
            else:
                tag = await conn.execute(
                    "UPDATE deploys SET cancel_request = $1 "
                    "WHERE id = $2 AND status = 'running' AND cancel_request IS NULL",
                    reason,
                    deploy_id,
                )
                kind = "cancel" if _count(tag) else ""
            if kind:
                await self._notify(conn, kind, deploy_id)
            row = await conn.fetchrow(
                f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.id = $1", deploy_id
            )
        if kind:
            self._announce(kind, deploy_id)
        return None if row is None else _deploy(row)

    async def cancel_requests(self, node: str) -> list[tuple[int, str]]:
        rows = await self._all(
            "SELECT id, cancel_request FROM deploys "
            "WHERE status = 'running' AND runner = $1 AND cancel_request IS NOT NULL",
            node,
        )
        return [(int(r[0]), str(r[1])) for r in rows]

    async def report_deploy(
        self, deploy_id: int, status: DeployStatus, exit_code: int | None
    ) -> bool:
        async with self._transaction() as conn:
            tag = await conn.execute(
                "UPDATE deploys SET report_status = $1, report_exit_code = $2 "
                "WHERE id = $3 AND status = 'running' AND report_status IS NULL",
                status.value,
                exit_code,
                deploy_id,
            )
            done = _count(tag) == 1
            if done:
                await self._notify(conn, "report", deploy_id)
        if done:
            self._announce("report", deploy_id)
        return done

    async def deploy_report(self, deploy_id: int) -> tuple[DeployStatus, int | None] | None:
        row = await self._one(
            "SELECT report_status, report_exit_code FROM deploys WHERE id = $1", deploy_id
        )
        if row is None or row[0] is None:
            return None
        return DeployStatus(row[0]), row[1]

    async def append_deploy_log(
        self, deploy_id: int, text: str, *, skipped: int = 0, closing: bool = False, keep: int
    ) -> int | None:
        text = storable(text)
        size = len(text.encode())
        async with self._transaction() as conn:
            # The row lock orders concurrent appends to one deploy (runner, status reports).
            row = await conn.fetchrow(
                "UPDATE deploys SET log_seq = log_seq + 1, log_bytes = log_bytes + $1 "
                "WHERE id = $2 RETURNING log_seq, log_bytes",
                skipped + size,
                deploy_id,
            )
            if row is None:
                return None
            seq, end = int(row[0]), int(row[1])
            await conn.execute(
                "INSERT INTO deploy_log_chunks (deploy_id, seq, position, size, closing, text) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                deploy_id,
                seq,
                end - size,
                size,
                int(closing),
                text,
            )
            await conn.execute(
                "DELETE FROM deploy_log_chunks "
                "WHERE deploy_id = $1 AND seq < $2 AND position + size <= $3",
                deploy_id,
                seq,
                end - keep,
            )
            await self._notify(conn, "log", deploy_id)
        self._announce("log", deploy_id)
        return seq

    async def deploy_log(self, deploy_id: int, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        rows = await self._all(
            "SELECT seq, position, size, closing, text FROM deploy_log_chunks "
            "WHERE deploy_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            deploy_id,
            after,
            limit,
        )
        return [LogChunk(int(r[0]), int(r[1]), int(r[2]), bool(r[3]), r[4]) for r in rows]

    # -- the processes sharing the queue --

    async def register_node(self, node: str, name: str, pid: int) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO nodes (id, name, pid, started_at, seen_at) "
                "VALUES ($1, $2, $3, now(), extract(epoch FROM clock_timestamp())) "
                "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                node,
                name,
                pid,
            )

    async def renew_node(self, node: str) -> bool:
        async with self._transaction() as conn:
            tag = await conn.execute(
                "UPDATE nodes SET seen_at = extract(epoch FROM clock_timestamp()) WHERE id = $1",
                node,
            )
        return _count(tag) == 1

    async def expire_nodes(self, lapse: float) -> list[Deploy]:
        async with self._transaction() as conn:
            # The database's clock judges every node: theirs need not agree.
            await conn.execute(
                "DELETE FROM nodes WHERE seen_at < extract(epoch FROM clock_timestamp()) - $1",
                float(lapse),
            )
            rows = await conn.fetch(
                """UPDATE deploys SET status = 'interrupted', finished_at = $1,
                       reason = CASE status WHEN 'running'
                           THEN 'the gateway running it stopped answering'
                           ELSE 'the gated push was lost with the gateway holding it' END
                    WHERE (status = 'running'
                           AND (runner IS NULL OR runner NOT IN (SELECT id FROM nodes)))
                       OR (status = 'queued' AND mode = 'gate'
                           AND (origin IS NULL OR origin NOT IN (SELECT id FROM nodes)))
                    RETURNING id""",
                to_time(utcnow()),
            )
            ids = sorted(int(r[0]) for r in rows)
            for deploy_id in ids:
                await self._notify(conn, "done", deploy_id)
            if ids:
                await self._notify(conn, "queue")
            found = await conn.fetch(
                f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.id = ANY($1::bigint[]) "
                "ORDER BY d.id",
                ids,
            )
        for deploy_id in ids:
            self._announce("done", deploy_id)
        if ids:
            self._announce("queue")
        return [_deploy(r) for r in found]

    async def leave_node(self, node: str) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM nodes WHERE id = $1", node)

    async def list_nodes(self) -> list[Node]:
        rows = await self._all("SELECT id, name, pid, started_at, seen_at FROM nodes ORDER BY id")
        return [Node(r[0], r[1], int(r[2]), _t(r[3]), float(r[4])) for r in rows]

    async def prune_deploys(self, before: datetime, keep_last: int, limit: int = 500) -> list[int]:
        async with self._transaction() as conn:
            rows = await conn.fetch(
                """SELECT d.id FROM deploys d
                    WHERE d.status <> ALL($1::text[])
                      AND COALESCE(d.finished_at, d.created_at) < $2
                      AND d.id NOT IN (
                          SELECT id FROM (
                              SELECT id, ROW_NUMBER() OVER (
                                  PARTITION BY app_id ORDER BY id DESC) AS newest
                                FROM deploys WHERE status <> ALL($1::text[])) ranked
                           WHERE newest <= $3)
                    ORDER BY d.id LIMIT $4""",
                _OPEN,
                to_time(before),
                keep_last,
                limit,
            )
            ids = [int(r[0]) for r in rows]
            if not ids:
                return []
            # A kept deploy may name a pruned one as its superseder: the link goes, the
            # reason text ("superseded by #N") stays.
            await conn.execute(
                "UPDATE deploys SET superseded_by = NULL WHERE superseded_by = ANY($1::bigint[])",
                ids,
            )
            deleted = await conn.fetch(
                "DELETE FROM deploys WHERE id = ANY($1::bigint[]) RETURNING id", ids
            )
        return sorted(int(r[0]) for r in deleted)

    async def existing_deploy_ids(self, ids: list[int]) -> set[int]:
        if not ids:
            return set()
        rows = await self._all("SELECT id FROM deploys WHERE id = ANY($1::bigint[])", ids)
        return {int(r[0]) for r in rows}

    async def set_status_token(self, deploy_id: int, token_hash: str) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE deploys SET status_token_hash = $1 WHERE id = $2", token_hash, deploy_id
            )

    async def status_token_hash(self, deploy_id: int) -> str | None:
        row = await self._one("SELECT status_token_hash FROM deploys WHERE id = $1", deploy_id)
        return None if row is None else row[0]

    async def add_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                """INSERT INTO webhook_deliveries
                       (deploy_id, attempt, url, status_code, error, duration_ms, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                delivery.deploy_id,
                delivery.attempt,
                delivery.url,
                delivery.status_code,
                delivery.error,
                delivery.duration_ms,
                to_time(delivery.created_at),
            )

    async def webhook_deliveries(self, deploy_id: int) -> list[WebhookDelivery]:
        rows = await self._all(
            "SELECT deploy_id, attempt, url, status_code, error, duration_ms, created_at "
            "FROM webhook_deliveries WHERE deploy_id = $1 ORDER BY attempt, id",
            deploy_id,
        )
        return [WebhookDelivery(*r[:6], _t(r[6])) for r in rows]  # type: ignore[arg-type]

    # -- audit trail --

    async def add_audit(self, event: AuditEvent) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                """INSERT INTO audit_events (at, event, actor, fingerprint, source, app, detail)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                to_time(event.at or utcnow()),
                event.event,
                event.actor,
                event.fingerprint,
                event.source,
                event.app,
                event.detail,
            )

    async def prune_audit(self, before: datetime, limit: int = 5000) -> int:
        async with self._transaction() as conn:
            tag = await conn.execute(
                "DELETE FROM audit_events WHERE id IN "
                "(SELECT id FROM audit_events WHERE at < $1 ORDER BY at, id LIMIT $2)",
                to_time(before),
                limit,
            )
        return _count(tag)

    async def list_audit(
        self, app: str | None = None, actor: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        clauses: list[str] = []
        args: list[Any] = []
        if app is not None:
            args.append(app)
            clauses.append(f"app = ${len(args)}")
        if actor is not None:
            # Events by the user, and operator events about them (detail.user).
            args.append(actor)
            clauses.append(f"(actor = ${len(args)} OR (detail::jsonb ->> 'user') = ${len(args)})")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        args.append(limit)
        rows = await self._all(
            "SELECT event, actor, fingerprint, source, app, detail, at, id "  # noqa: S608
            f"FROM audit_events {where} ORDER BY id DESC LIMIT ${len(args)}",
            *args,
        )
        return [AuditEvent(*r[:6], _t(r[6]), r[7]) for r in rows]  # type: ignore[arg-type]

    # -- API tokens --

    async def _token_where(self, conn: Any, clause: str, *args: Any) -> ApiToken | None:
        row = await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} {_TOKEN_FROM} WHERE {clause}", *args)
        return None if row is None else _token(row)

    async def create_token(
        self,
        name: str,
        user_name: str | None,
        token_hash: str,
        expires_at: datetime | None = None,
    ) -> ApiToken:
        try:
            async with self._transaction() as conn:
                user_id = None
                if user_name is not None:
                    user_id = (await self._user_row(conn, user_name)).id
                token_id = await conn.fetchval(
                    "INSERT INTO api_tokens (name, user_id, token_hash, created_at, expires_at) "
                    "VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    name,
                    user_id,
                    token_hash,
                    to_time(utcnow()),
                    None if expires_at is None else to_time(expires_at),
                )
                token = await self._token_where(conn, "t.id = $1", token_id)
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a token named '{name}' already exists") from None
        return token  # type: ignore[return-value]

    async def list_tokens(self) -> list[ApiToken]:
        rows = await self._all(f"SELECT {_TOKEN_COLUMNS} {_TOKEN_FROM} ORDER BY t.name {_BYTES}")
        return [_token(r) for r in rows]

    async def remove_token(self, name: str) -> ApiToken:
        async with self._transaction() as conn:
            token = await self._token_where(conn, "t.name = $1", name)
            if token is None:
                raise NotFound(f"no token named '{name}'")
            await conn.execute("DELETE FROM api_tokens WHERE id = $1", token.id)
        return token

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        async with self._reachable():
            return await self._token_where(self._db(), "t.token_hash = $1", token_hash)

    async def touch_token(self, token_id: int, when: datetime) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE api_tokens SET last_used_at = $1 WHERE id = $2", to_time(when), token_id
            )

    # -- keys page sessions --

    async def create_web_session(
        self, id_hash: str, token_id: int, created_at: datetime, expires_at: datetime, keep: int
    ) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO web_sessions (id_hash, token_id, created_at, expires_at, "
                "last_seen_at) VALUES ($1, $2, $3, $4, $3)",
                id_hash,
                token_id,
                to_time(created_at),
                to_time(expires_at),
            )
            await conn.execute(
                "DELETE FROM web_sessions WHERE token_id = $1 AND id NOT IN "
                "(SELECT id FROM web_sessions WHERE token_id = $1 ORDER BY id DESC LIMIT $2)",
                token_id,
                keep,
            )

    async def web_session(self, id_hash: str) -> WebSession | None:
        row = await self._one(
            f"SELECT s.id, s.created_at, s.expires_at, s.last_seen_at, {_TOKEN_COLUMNS} "  # noqa: S608
            f"FROM web_sessions s JOIN api_tokens t ON t.id = s.token_id "
            f"LEFT JOIN users u ON u.id = t.user_id WHERE s.id_hash = $1",
            id_hash,
        )
        if row is None:
            return None
        created, expires, seen = (_t(v) for v in row[1:4])
        return WebSession(row[0], _token(row[4:]), created, expires, seen)  # type: ignore[arg-type]

    async def touch_web_session(self, id_hash: str, when: datetime) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE web_sessions SET last_seen_at = $1 WHERE id_hash = $2",
                to_time(when),
                id_hash,
            )

    async def remove_web_session(self, id_hash: str) -> bool:
        async with self._transaction() as conn:
            tag = await conn.execute("DELETE FROM web_sessions WHERE id_hash = $1", id_hash)
        return _count(tag) > 0

    async def prune_web_sessions(self, now: datetime, idle_since: datetime) -> int:
        async with self._transaction() as conn:
            tag = await conn.execute(
                "DELETE FROM web_sessions WHERE expires_at <= $1 OR last_seen_at <= $2",
                to_time(now),
                to_time(idle_since),
            )
        return _count(tag)


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
