"""SQLite backend of the registry (aiosqlite, WAL, numbered migrations)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from .. import times
from ..errors import Conflict, KeyLimitReached, NotFound, StoreUnavailable
from ..keys import PublicKey
from ..models import (
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
from . import (
    KeyOwner,
    Queued,
    Store,
    UserSummary,
    WebSession,
    packaged_migrations,
    storable,
    utcnow,
)

_KEY_COLUMNS = """k.id, k.user_id, u.name, k.name, k.algorithm, k.bits, k.public_key, k.comment,
    k.fingerprint, k.fingerprint_md5, k.created_at, k.last_used_at, k.expires_at,
    k.app_id, ka.name, k.access, k.scoped,
    (SELECT group_concat(sa.name, char(10)) FROM key_apps s JOIN apps sa ON sa.id = s.app_id
     WHERE s.key_id = k.id)"""
_KEY_FROM = """FROM ssh_keys k LEFT JOIN users u ON u.id = k.user_id
    LEFT JOIN apps ka ON ka.id = k.app_id"""
_TOKEN_COLUMNS = "t.id, t.name, t.user_id, u.name, t.created_at, t.last_used_at, t.expires_at"  # noqa: S105
_APP_COLUMNS = "a.id, a.name, a.owner_id, u.name, a.deploy_branch, a.created_at"
_DEPLOY_COLUMNS = """d.id, d.app_id, a.name, d.ref, d.old_sha, d.new_sha, d.pusher,
    d.key_fingerprint, d.subject, d.author, d.mode, d.pipeline, d.status, d.superseded_by,
    d.exit_code, d.reason,
    d.created_at, d.started_at, d.finished_at, d.runner, d.duration_ms,
    d.note"""
_DEPLOY_FROM = "FROM deploys d JOIN apps a ON a.id = d.app_id"
_OPEN = (DeployStatus.QUEUED.value, DeployStatus.RUNNING.value)


# Times are stored as text in the one form (times.text), which sorts as the times do.
sqlite3.register_adapter(datetime, times.text)
_t = times.maybe


def _clock() -> float:
    """The leases' clock: seconds since the machine booted, the same for every process of
    the machine (a SQLite registry is never shared across machines) and never stepped by
    a wall-clock change."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every SQLite migration, in order."""
    return packaged_migrations("gateway.store")


def _key(row: Any) -> SSHKey:
    values = list(row)
    values[10], values[11], values[12] = _t(values[10]), _t(values[11]), _t(values[12])
    scoped, names = values[16], values[17]
    scope = tuple(sorted(names.split("\n"))) if scoped and names else () if scoped else None
    return SSHKey(*values[:16], scope=scope)


def _app(row: Any) -> App:
    return App(*row[:5], _t(row[5]))  # type: ignore[arg-type]


def _deploy(row: Any) -> Deploy:
    values = list(row)
    values[12] = DeployStatus(values[12])
    values[16:19] = [_t(v) for v in values[16:19]]
    return Deploy(*values)


def _user(row: Any) -> User:
    return User(row[0], row[1], _t(row[2]))  # type: ignore[arg-type]


def _token(row: Any) -> ApiToken:
    return ApiToken(*row[:4], _t(row[4]), _t(row[5]), _t(row[6]))  # type: ignore[arg-type]


class SQLiteStore(Store):
    """One aiosqlite connection; write transactions are serialized by a lock, because
    statements from concurrent coroutines on one connection would otherwise join them."""

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
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
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

    # -- plumbing --

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction()  # type: ignore[return-value]

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._writer is not None and self._writer is asyncio.current_task():
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

    async def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        """Run a query to its end in one step on the connection's thread. Outside this
        task's own transaction it waits for any other task's: on one connection a read would
        otherwise see another task's uncommitted writes, and a statement left open across
        an await holds an old snapshot that makes the next BEGIN IMMEDIATE fail at once
        ("database is locked") when another process has written meanwhile."""
        if self._writer is not None and self._writer is asyncio.current_task():
            return list(await self._db.execute_fetchall(sql, args))
        async with self._write_lock, self._reachable():
            return list(await self._db.execute_fetchall(sql, args))

    async def _one(self, sql: str, *args: Any) -> Any:
        rows = await self._read(sql, args)
        return rows[0] if rows else None

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        return await self._read(sql, args)

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
                    done = await self._one(
                        "SELECT 1 FROM schema_migrations WHERE version = ?", number
                    )
                    if not done:
                        # sqlite3's executescript() would COMMIT our transaction first, so run
                        # the statements one by one inside it.
                        for statement in _statements(sql):
                            await db.execute(statement)
                        broken = await self._all("PRAGMA foreign_key_check")
                        if broken:
                            raise RuntimeError(
                                f"migration {number:04d}_{name} breaks foreign keys: {broken[:5]}"
                            )
                        await db.execute(
                            "INSERT INTO schema_migrations (version, name, applied_at) "
                            "VALUES (?, ?, ?)",
                            (number, name, utcnow()),
                        )
                        self.applied += 1
                version = number
        finally:
            await self._db.execute("PRAGMA foreign_keys = ON")
        return version

    async def snapshot(
        self, tables: Sequence[tuple[str, Sequence[str]]]
    ) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, int]]:
        """Every row of these tables (the named columns, in key order) and each table's id
        high-water mark (the highest id ever handed out), read in one transaction: a
        consistent copy even while the gateway writes."""
        rows: dict[str, list[tuple[Any, ...]]] = {}
        marks: dict[str, int] = {}
        async with self._transaction() as db:
            sequences = dict(await db.execute_fetchall("SELECT name, seq FROM sqlite_sequence"))
            for table, columns in tables:
                # Table and column names come from the code's own list, never from input.
                found = await db.execute_fetchall(
                    f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1, 2"  # noqa: S608
                )
                rows[table] = [tuple(r) for r in found]
                if columns[0] == "id":
                    highest = max((r[0] for r in rows[table]), default=0)
                    marks[table] = max(int(sequences.get(table) or 0), highest)
        return rows, marks

    async def schema_version(self) -> int:
        row = await self._one("SELECT MAX(version) FROM schema_migrations")
        return int(row[0] or 0)

    # -- users --

    async def _user_row(self, name: str) -> User:
        row = await self._one("SELECT id, name, created_at FROM users WHERE name = ?", name)
        if row is None:
            raise NotFound(f"no such user '{name}'")
        return _user(row)

    async def create_user(self, name: str) -> User:
        async with self._transaction() as db:
            try:
                await db.execute(
                    "INSERT INTO users (name, created_at) VALUES (?, ?)", (name, utcnow())
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"user '{name}' already exists") from None
            return await self._user_row(name)

    async def get_user(self, name: str) -> User:
        return await self._user_row(name)

    async def list_users(self) -> list[UserSummary]:
        rows = await self._all(
            """SELECT u.id, u.name, u.created_at,
                      (SELECT COUNT(*) FROM ssh_keys k WHERE k.user_id = u.id),
                      (SELECT COUNT(*) FROM apps a WHERE a.owner_id = u.id)
                 FROM users u ORDER BY u.name"""
        )
        return [UserSummary(_user(r[:3]), r[3], r[4]) for r in rows]

    async def remove_user(self, name: str) -> User:
        async with self._transaction() as db:
            user = await self._user_row(name)
            owned = await self._all(
                "SELECT name FROM apps WHERE owner_id = ? ORDER BY name", user.id
            )
            if owned:
                names = ", ".join(r[0] for r in owned)
                raise Conflict(f"user '{name}' owns apps ({names}): remove them first")
            await db.execute("DELETE FROM users WHERE id = ?", (user.id,))
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
        async with self._transaction() as db:
            user = await self._user_row(user_name)
            apps = [await self._app_row(name) for name in scope or []]
            key_id = await self._add(
                db,
                KeyOwner("user_id", user.id, user_name),
                key,
                key_name,
                expires_at,
                access=access,
                scoped=scope,
                limit=limit,
            )
            for app in apps:
                await db.execute(
                    "INSERT OR IGNORE INTO key_apps (key_id, app_id) VALUES (?, ?)",
                    (key_id, app.id),
                )
            return await self._key_by_id(key_id)

    async def add_deploy_key(
        self,
        app_name: str,
        key_name: str,
        key: PublicKey,
        access: str,
        expires_at: datetime | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        async with self._transaction() as db:
            app = await self._app_row(app_name)
            key_id = await self._add(
                db,
                KeyOwner("app_id", app.id, app_name),
                key,
                key_name,
                expires_at,
                access=access,
                limit=limit,
            )
            return await self._key_by_id(key_id)

    async def _add(
        self,
        db: aiosqlite.Connection,
        owner: KeyOwner,
        key: PublicKey,
        key_name: str,
        expires_at: datetime | None,
        *,
        access: str | None,
        scoped: list[str] | None = None,
        limit: int | None,
    ) -> int:
        """A user's or an app's new key, inside the caller's write transaction (serialized:
        the count cannot change under us); its id."""
        if limit is not None and await self._count_keys(owner.column, owner.id) >= limit:
            raise KeyLimitReached(owner.name, limit, deploy=owner.deploy)
        existing = await self.find_key(key.fingerprint)
        if existing is not None:
            owner.refuse(existing)
        key_id = await self._insert_key(
            db, key, key_name, expires_at, **{owner.column: owner.id}, access=access, scoped=scoped
        )
        if key_id is None:
            raise owner.name_taken(key_name)
        return key_id

    async def _insert_key(
        self,
        db: aiosqlite.Connection,
        key: PublicKey,
        key_name: str,
        expires_at: datetime | None,
        *,
        user_id: int | None = None,
        app_id: int | None = None,
        access: str | None = None,
        scoped: list[str] | None = None,
    ) -> int | None:
        """The new key's id, or None if its owner has a key of that name already."""
        try:
            cur = await db.execute(
                """INSERT INTO ssh_keys (user_id, app_id, name, algorithm, bits, public_key,
                       comment, fingerprint, fingerprint_md5, created_at, expires_at, access,
                       scoped)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    user_id,
                    app_id,
                    key_name,
                    key.algorithm,
                    key.bits,
                    key.openssh,
                    key.comment,
                    key.fingerprint,
                    key.fingerprint_md5,
                    utcnow(),
                    expires_at,
                    access,
                    int(scoped is not None),
                ),
            )
        except sqlite3.IntegrityError:
            return None
        return int(cur.lastrowid or 0)

    async def _count_keys(self, owner_column: str, owner_id: int) -> int:
        # owner_column is a KeyOwner.column: user_id or app_id, checked there.
        row = await self._one(f"SELECT count(*) FROM ssh_keys WHERE {owner_column} = ?", owner_id)  # noqa: S608
        return int(row[0])

    async def _key_by_id(self, key_id: int) -> SSHKey:
        row = await self._one(f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.id = ?", key_id)
        return _key(row)

    async def list_deploy_keys(self, app_name: str) -> list[SSHKey]:
        app = await self._app_row(app_name)
        return await self._owned_keys(KeyOwner("app_id", app.id, app_name))

    async def remove_deploy_key(self, app_name: str, key_name: str) -> SSHKey:
        async with self._transaction() as db:
            app = await self._app_row(app_name)
            return await self._remove_owned(db, KeyOwner("app_id", app.id, app_name), key_name)

    async def list_keys(self, user_name: str) -> list[SSHKey]:
        user = await self._user_row(user_name)
        return await self._owned_keys(KeyOwner("user_id", user.id, user_name))

    async def remove_key(self, user_name: str, key_name: str) -> SSHKey:
        async with self._transaction() as db:
            user = await self._user_row(user_name)
            return await self._remove_owned(db, KeyOwner("user_id", user.id, user_name), key_name)

    async def _owned_keys(self, owner: KeyOwner) -> list[SSHKey]:
        rows = await self._all(
            f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.{owner.column} = ? ORDER BY k.name",
            owner.id,
        )
        return [_key(r) for r in rows]

    async def _remove_owned(
        self, db: aiosqlite.Connection, owner: KeyOwner, key_name: str
    ) -> SSHKey:
        row = await self._one(
            f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.{owner.column} = ? AND k.name = ?",
            owner.id,
            key_name,
        )
        if row is None:
            raise owner.missing(key_name)
        await db.execute("DELETE FROM ssh_keys WHERE id = ?", (row[0],))
        return _key(row)

    async def find_key(self, fingerprint: str) -> SSHKey | None:
        row = await self._one(
            f"SELECT {_KEY_COLUMNS} {_KEY_FROM} WHERE k.fingerprint = ?",
            fingerprint,
        )
        return None if row is None else _key(row)

    async def touch_key(self, key_id: int, when: datetime) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE ssh_keys SET last_used_at = ? WHERE id = ?", (when, key_id))

    # -- apps --

    async def _app_row(self, name: str) -> App:
        app = await self.get_app(name)
        if app is None:
            raise NotFound(f"no such app '{name}'")
        return app

    async def create_app(self, name: str, owner_name: str, deploy_branch: str) -> App:
        async with self._transaction() as db:
            owner = await self._user_row(owner_name)
            try:
                await db.execute(
                    "INSERT INTO apps (name, owner_id, deploy_branch, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (name, owner.id, deploy_branch, utcnow()),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"app '{name}' already exists") from None
            return await self._app_row(name)

    async def get_app(self, name: str) -> App | None:
        row = await self._one(
            f"SELECT {_APP_COLUMNS} FROM apps a JOIN users u ON u.id = a.owner_id "  # noqa: S608
            "WHERE a.name = ?",
            name,
        )
        return None if row is None else _app(row)

    async def list_apps(self) -> list[App]:
        rows = await self._all(
            f"SELECT {_APP_COLUMNS} FROM apps a JOIN users u ON u.id = a.owner_id "  # noqa: S608
            "ORDER BY a.name"
        )
        return [_app(r) for r in rows]

    async def remove_app(self, name: str) -> App:
        async with self._transaction() as db:
            app = await self._app_row(name)
            await db.execute("DELETE FROM apps WHERE id = ?", (app.id,))
            return app

    async def grant(self, app_name: str, user_name: str, role: Role) -> Role | None:
        if role is Role.OWNER:
            raise ValueError("owner is not a grantable role")
        async with self._transaction() as db:
            app = await self._app_row(app_name)
            user = await self._user_row(user_name)
            if user.id == app.owner_id:
                raise Conflict(f"'{user_name}' owns app '{app_name}' and already has every right")
            previous = await self._one(
                "SELECT role FROM app_members WHERE app_id = ? AND user_id = ?", app.id, user.id
            )
            await db.execute(
                """INSERT INTO app_members (app_id, user_id, role, created_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (app_id, user_id) DO UPDATE SET role = excluded.role""",
                (app.id, user.id, role.label, utcnow()),
            )
            return None if previous is None else Role.parse(previous[0])

    async def revoke(self, app_name: str, user_name: str) -> Role:
        async with self._transaction() as db:
            app = await self._app_row(app_name)
            user = await self._user_row(user_name)
            row = await self._one(
                "SELECT role FROM app_members WHERE app_id = ? AND user_id = ?", app.id, user.id
            )
            if row is None:
                if user.id == app.owner_id:
                    raise Conflict(
                        f"'{user_name}' owns app '{app_name}': ownership is not revocable"
                    )
                raise NotFound(f"'{user_name}' is not a member of app '{app_name}'")
            await db.execute(
                "DELETE FROM app_members WHERE app_id = ? AND user_id = ?", (app.id, user.id)
            )
            return Role.parse(row[0])

    async def list_members(self, app_name: str) -> list[Member]:
        app = await self._app_row(app_name)
        rows = await self._all(
            """SELECT u.name, m.role, m.created_at FROM app_members m
                 JOIN users u ON u.id = m.user_id WHERE m.app_id = ? ORDER BY u.name""",
            app.id,
        )
        owner = Member(app.owner_name, Role.OWNER, app.created_at)
        return [owner, *(Member(r[0], Role.parse(r[1]), _t(r[2])) for r in rows)]  # type: ignore[arg-type]

    async def role_on(self, app_id: int, user_id: int) -> Role | None:
        row = await self._one(
            """SELECT CASE WHEN a.owner_id = ? THEN 'owner' ELSE m.role END
                 FROM apps a LEFT JOIN app_members m ON m.app_id = a.id AND m.user_id = ?
                WHERE a.id = ?""",
            user_id,
            user_id,
            app_id,
        )
        if row is None or row[0] is None:
            return None
        return Role.OWNER if row[0] == "owner" else Role.parse(row[0])

    async def apps_for(self, user_id: int) -> list[tuple[App, Role]]:
        rows = await self._all(
            f"""SELECT {_APP_COLUMNS}, CASE WHEN a.owner_id = ? THEN 'owner' ELSE m.role END
                  FROM apps a JOIN users u ON u.id = a.owner_id
                  LEFT JOIN app_members m ON m.app_id = a.id AND m.user_id = ?
                 WHERE a.owner_id = ? OR m.user_id IS NOT NULL
                 ORDER BY a.name""",  # noqa: S608
            user_id,
            user_id,
            user_id,
        )
        return [(_app(r[:6]), Role.OWNER if r[6] == "owner" else Role.parse(r[6])) for r in rows]

    # -- deploys --

    async def _insert_deploy(
        self, db: aiosqlite.Connection, new: NewDeploy, now: datetime, origin: str | None
    ) -> int:
        cur = await db.execute(
            """INSERT INTO deploys (app_id, ref, old_sha, new_sha, pusher, key_fingerprint,
                   subject, author, mode, pipeline, status, created_at, origin, note)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)""",
            (
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
            ),
        )
        return int(cur.lastrowid or 0)

    async def create_deploy(self, new: NewDeploy) -> Deploy:
        async with self._transaction() as db:
            deploy_id = await self._insert_deploy(db, new, utcnow(), None)
        found = await self.get_deploy(deploy_id)
        if found is None:  # pragma: no cover - just inserted
            raise RuntimeError("deploy vanished")
        return found

    async def get_deploy(self, deploy_id: int) -> Deploy | None:
        row = await self._one(f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.id = ?", deploy_id)
        return None if row is None else _deploy(row)

    async def list_deploys(self, app_name: str, limit: int = 20) -> list[Deploy]:
        app = await self._app_row(app_name)
        rows = await self._all(
            f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.app_id = ? "
            "ORDER BY d.id DESC LIMIT ?",
            app.id,
            limit,
        )
        return [_deploy(r) for r in rows]

    async def app_deploy_ids(self, app_name: str) -> list[int]:
        app = await self._app_row(app_name)
        rows = await self._all("SELECT id FROM deploys WHERE app_id = ? ORDER BY id", app.id)
        return [int(r[0]) for r in rows]

    async def reserve_deploy_ids(self, through: int) -> None:
        # AUTOINCREMENT's high-water mark lives in sqlite_sequence (one row per table, made
        # at the first insert); raising it is how ids up to `through` are never given.
        async with self._transaction() as db:
            row = await self._one("SELECT seq FROM sqlite_sequence WHERE name = 'deploys'")
            if row is None:
                await db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('deploys', ?)", (through,)
                )
            elif int(row[0]) < through:
                await db.execute(
                    "UPDATE sqlite_sequence SET seq = ? WHERE name = 'deploys'", (through,)
                )

    async def deploys_in(self, statuses: tuple[DeployStatus, ...]) -> list[Deploy]:
        marks = ", ".join("?" for _ in statuses)
        rows = await self._all(
            f"SELECT {_DEPLOY_COLUMNS} {_DEPLOY_FROM} WHERE d.status IN ({marks}) ORDER BY d.id",
            *(s.value for s in statuses),
        )
        return [_deploy(r) for r in rows]

    async def start_deploy(self, deploy_id: int, when: datetime) -> bool:
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE deploys SET status = 'running', started_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (when, deploy_id),
            )
            return cur.rowcount == 1

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
        async with self._transaction() as db:
            cur = await db.execute(
                """UPDATE deploys SET status = ?, finished_at = ?, exit_code = ?, reason = ?,
                       superseded_by = ?, duration_ms = ?, cancel_request = NULL
                   WHERE id = ? AND status IN (?, ?)""",
                (
                    status.value,
                    when,
                    exit_code,
                    reason,
                    superseded_by,
                    duration_ms,
                    deploy_id,
                    *_OPEN,
                ),
            )
            done = cur.rowcount == 1
        if done:
            self._announce("done", deploy_id)
        return done

    # -- the shared queue --

    async def queue_deploy(self, new: NewDeploy, *, origin: str | None = None) -> Queued:
        async with self._transaction() as db:
            now = utcnow()
            deploy_id = await self._insert_deploy(db, new, now, origin)
            waiting = await self._all(
                "SELECT id FROM deploys WHERE app_id = ? AND status = 'queued' AND id < ? "
                "ORDER BY id",
                new.app_id,
                deploy_id,
            )
            superseded = [int(r[0]) for r in waiting]
            for older in superseded:
                await db.execute(
                    """UPDATE deploys SET status = 'cancelled', finished_at = ?,
                           reason = ?, superseded_by = ?
                       WHERE id = ? AND status = 'queued'""",
                    (now, f"superseded by #{deploy_id}", deploy_id, older),
                )
        deploy = await self.get_deploy(deploy_id)
        if deploy is None:  # pragma: no cover - just inserted
            raise RuntimeError("deploy vanished")
        for older in superseded:
            self._announce("done", older)
        self._announce("queue", deploy_id)
        return Queued(deploy, superseded)

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
        # Idle gateways look often: a read first, the write lock only when there is work.
        if await self._one("SELECT 1 FROM deploys WHERE status = 'queued' LIMIT 1") is None:
            return None
        wanted = ""
        if only is not None:
            wanted = f"AND d.id IN ({', '.join(str(int(i)) for i in only) or 'NULL'})"
        async with self._transaction() as db:
            # One transaction holds SQLite's write lock: no other process claims meanwhile.
            if await self._one("SELECT 1 FROM nodes WHERE id = ?", node) is None:
                return None  # declared gone: it runs nothing until it has joined again
            busy = await self._one(
                "SELECT COUNT(*) FROM deploys d JOIN nodes n ON n.id = d.runner "
                "WHERE d.status = 'running' AND n.name = ?",
                node_name,
            )
            if int(busy[0]) >= max_parallel:
                return None
            row = await self._one(
                f"""SELECT d.id FROM deploys d
                    WHERE d.status = 'queued' AND (d.mode <> 'gate' OR d.origin = ?) {wanted}
                      AND NOT EXISTS (SELECT 1 FROM deploys r
                                       WHERE r.app_id = d.app_id AND r.status = 'running')
                    ORDER BY d.id LIMIT 1""",  # noqa: S608 - ids are ints formatted here
                node,
            )
            if row is None:
                return None
            await db.execute(
                "UPDATE deploys SET status = 'running', started_at = ?, runner = ? "
                "WHERE id = ? AND status = 'queued'",
                (utcnow(), node, row[0]),
            )
        return await self.get_deploy(int(row[0]))

    async def request_cancel(self, deploy_id: int, reason: str) -> Deploy | None:
        kind = ""
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE deploys SET status = 'cancelled', finished_at = ?, reason = ? "
                "WHERE id = ? AND status = 'queued'",
                (utcnow(), reason, deploy_id),
            )
            if cur.rowcount:
                kind = "done"
            else:
                cur = await db.execute(
                    "UPDATE deploys SET cancel_request = ? "
                    "WHERE id = ? AND status = 'running' AND cancel_request IS NULL",
                    (reason, deploy_id),
                )
                kind = "cancel" if cur.rowcount else ""
        if kind:
            self._announce(kind, deploy_id)
        return await self.get_deploy(deploy_id)

    async def cancel_requests(self, node: str) -> list[tuple[int, str]]:
        rows = await self._all(
            "SELECT id, cancel_request FROM deploys "
            "WHERE status = 'running' AND runner = ? AND cancel_request IS NOT NULL",
            node,
        )
        return [(int(r[0]), str(r[1])) for r in rows]

    async def report_deploy(
        self, deploy_id: int, status: DeployStatus, exit_code: int | None
    ) -> bool:
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE deploys SET report_status = ?, report_exit_code = ? "
                "WHERE id = ? AND status = 'running' AND report_status IS NULL",
                (status.value, exit_code, deploy_id),
            )
            done = cur.rowcount == 1
        if done:
            self._announce("report", deploy_id)
        return done

    async def deploy_report(self, deploy_id: int) -> tuple[DeployStatus, int | None] | None:
        row = await self._one(
            "SELECT report_status, report_exit_code FROM deploys WHERE id = ?", deploy_id
        )
        if row is None or row[0] is None:
            return None
        return DeployStatus(row[0]), row[1]

    async def append_deploy_log(
        self, deploy_id: int, text: str, *, skipped: int = 0, closing: bool = False, keep: int
    ) -> int | None:
        text = storable(text)
        size = len(text.encode())
        async with self._transaction() as db:
            row = await self._one("SELECT log_seq, log_bytes FROM deploys WHERE id = ?", deploy_id)
            if row is None:
                return None
            seq, position = int(row[0]) + 1, int(row[1]) + skipped
            await db.execute(
                "UPDATE deploys SET log_seq = ?, log_bytes = ? WHERE id = ?",
                (seq, position + size, deploy_id),
            )
            await db.execute(
                "INSERT INTO deploy_log_chunks (deploy_id, seq, position, size, closing, text) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (deploy_id, seq, position, size, int(closing), text),
            )
            # Whole chunks that end before the kept tail go; the newest always stays.
            await db.execute(
                "DELETE FROM deploy_log_chunks "
                "WHERE deploy_id = ? AND seq < ? AND position + size <= ?",
                (deploy_id, seq, position + size - keep),
            )
        self._announce("log", deploy_id)
        return seq

    async def deploy_log(self, deploy_id: int, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        rows = await self._all(
            "SELECT seq, position, size, closing, text FROM deploy_log_chunks "
            "WHERE deploy_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            deploy_id,
            after,
            limit,
        )
        return [LogChunk(int(r[0]), int(r[1]), int(r[2]), bool(r[3]), r[4]) for r in rows]

    # -- the processes sharing the queue --

    async def register_node(self, node: str, name: str, pid: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO nodes (id, name, pid, started_at, seen_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                (node, name, pid, utcnow(), _clock()),
            )

    async def renew_node(self, node: str) -> bool:
        async with self._transaction() as db:
            cur = await db.execute("UPDATE nodes SET seen_at = ? WHERE id = ?", (_clock(), node))
            return cur.rowcount == 1

    async def expire_nodes(self, lapse: float) -> list[Deploy]:
        async with self._transaction() as db:
            now = _clock()
            # A time ahead of this clock was renewed before the machine restarted.
            await db.execute(
                "DELETE FROM nodes WHERE seen_at < ? OR seen_at > ?", (now - lapse, now + 1)
            )
            rows = await self._all(
                """SELECT id FROM deploys
                    WHERE (status = 'running'
                           AND (runner IS NULL OR runner NOT IN (SELECT id FROM nodes)))
                       OR (status = 'queued' AND mode = 'gate'
                           AND (origin IS NULL OR origin NOT IN (SELECT id FROM nodes)))
                    ORDER BY id"""
            )
            ids = [int(r[0]) for r in rows]
            now = utcnow()
            for deploy_id in ids:
                await db.execute(
                    """UPDATE deploys SET status = 'interrupted', finished_at = ?,
                           reason = CASE status WHEN 'running'
                               THEN 'the gateway running it stopped answering'
                               ELSE 'the gated push was lost with the gateway holding it' END
                       WHERE id = ? AND status IN ('queued', 'running')""",
                    (now, deploy_id),
                )
        found = [d for d in [await self.get_deploy(i) for i in ids] if d is not None]
        for deploy in found:
            self._announce("done", deploy.id)
        if found:
            self._announce("queue")
        return found

    async def leave_node(self, node: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM nodes WHERE id = ?", (node,))

    async def list_nodes(self) -> list[Node]:
        rows = await self._all("SELECT id, name, pid, started_at, seen_at FROM nodes ORDER BY id")
        return [Node(r[0], r[1], int(r[2]), _t(r[3]), float(r[4])) for r in rows]  # type: ignore[arg-type]

    async def prune_deploys(self, before: datetime, keep_last: int, limit: int = 500) -> list[int]:
        async with self._transaction() as db:
            rows = await self._all(
                """SELECT d.id FROM deploys d
                    WHERE d.status NOT IN (?, ?)
                      AND COALESCE(d.finished_at, d.created_at) < ?
                      AND d.id NOT IN (
                          SELECT id FROM (
                              SELECT id, ROW_NUMBER() OVER (
                                  PARTITION BY app_id ORDER BY id DESC) AS newest
                                FROM deploys WHERE status NOT IN (?, ?))
                           WHERE newest <= ?)
                    ORDER BY d.id LIMIT ?""",
                *_OPEN,
                before,
                *_OPEN,
                keep_last,
                limit,
            )
            ids = [r[0] for r in rows]
            if ids:
                marks = ", ".join("?" for _ in ids)
                # A kept deploy may name a pruned one as its superseder: the link goes, the
                # reason text ("superseded by #N") stays.
                await db.execute(
                    f"UPDATE deploys SET superseded_by = NULL WHERE superseded_by IN ({marks})",  # noqa: S608
                    ids,
                )
                await db.execute(f"DELETE FROM deploys WHERE id IN ({marks})", ids)  # noqa: S608
            return ids

    async def existing_deploy_ids(self, ids: list[int]) -> set[int]:
        found: set[int] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = await self._all(f"SELECT id FROM deploys WHERE id IN ({marks})", *chunk)  # noqa: S608
            found.update(r[0] for r in rows)
        return found

    async def set_status_token(self, deploy_id: int, token_hash: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE deploys SET status_token_hash = ? WHERE id = ?", (token_hash, deploy_id)
            )

    async def status_token_hash(self, deploy_id: int) -> str | None:
        row = await self._one("SELECT status_token_hash FROM deploys WHERE id = ?", deploy_id)
        return None if row is None else row[0]

    async def add_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO webhook_deliveries
                       (deploy_id, attempt, url, status_code, error, duration_ms, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (
                    delivery.deploy_id,
                    delivery.attempt,
                    delivery.url,
                    delivery.status_code,
                    delivery.error,
                    delivery.duration_ms,
                    delivery.created_at,
                ),
            )

    async def webhook_deliveries(self, deploy_id: int) -> list[WebhookDelivery]:
        rows = await self._all(
            "SELECT deploy_id, attempt, url, status_code, error, duration_ms, created_at "
            "FROM webhook_deliveries WHERE deploy_id = ? ORDER BY attempt",
            deploy_id,
        )
        return [WebhookDelivery(*r[:6], _t(r[6])) for r in rows]  # type: ignore[arg-type]

    # -- audit trail --

    async def add_audit(self, event: AuditEvent) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO audit_events (at, event, actor, fingerprint, source, app, detail)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (
                    event.at or utcnow(),
                    event.event,
                    event.actor,
                    event.fingerprint,
                    event.source,
                    event.app,
                    event.detail,
                ),
            )

    async def prune_audit(self, before: datetime, limit: int = 5000) -> int:
        async with self._transaction() as db:
            cur = await db.execute(
                "DELETE FROM audit_events WHERE id IN "
                "(SELECT id FROM audit_events WHERE at < ? ORDER BY at LIMIT ?)",
                (before, limit),
            )
            return cur.rowcount

    async def list_audit(
        self, app: str | None = None, actor: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        clauses, args = [], []
        if app is not None:
            clauses.append("app = ?")
            args.append(app)
        if actor is not None:
            # Events by the user, and operator events about them (detail.user).
            clauses.append("(actor = ? OR json_extract(detail, '$.user') = ?)")
            args += [actor, actor]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._all(
            "SELECT event, actor, fingerprint, source, app, detail, at, id "  # noqa: S608
            f"FROM audit_events {where} ORDER BY id DESC LIMIT ?",
            *args,
            limit,
        )
        return [AuditEvent(*r[:6], _t(r[6]), r[7]) for r in rows]

    # -- API tokens --

    async def create_token(
        self,
        name: str,
        user_name: str | None,
        token_hash: str,
        expires_at: datetime | None = None,
    ) -> ApiToken:
        async with self._transaction() as db:
            user_id = None if user_name is None else (await self._user_row(user_name)).id
            try:
                cur = await db.execute(
                    "INSERT INTO api_tokens (name, user_id, token_hash, created_at, expires_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, user_id, token_hash, utcnow(), expires_at),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"a token named '{name}' already exists") from None
            return await self._token_where("t.id = ?", cur.lastrowid)  # type: ignore[return-value]

    async def _token_where(self, clause: str, *args: Any) -> ApiToken | None:
        row = await self._one(
            f"SELECT {_TOKEN_COLUMNS} "  # noqa: S608
            f"FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id WHERE {clause}",
            *args,
        )
        return None if row is None else _token(row)

    async def list_tokens(self) -> list[ApiToken]:
        rows = await self._all(
            f"SELECT {_TOKEN_COLUMNS} "  # noqa: S608
            "FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id ORDER BY t.name"
        )
        return [_token(r) for r in rows]

    async def remove_token(self, name: str) -> ApiToken:
        async with self._transaction() as db:
            token = await self._token_where("t.name = ?", name)
            if token is None:
                raise NotFound(f"no token named '{name}'")
            await db.execute("DELETE FROM api_tokens WHERE id = ?", (token.id,))
            return token

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        return await self._token_where("t.token_hash = ?", token_hash)

    async def touch_token(self, token_id: int, when: datetime) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (when, token_id)
            )

    # -- keys page sessions --

    async def create_web_session(
        self, id_hash: str, token_id: int, created_at: datetime, expires_at: datetime, keep: int
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO web_sessions (id_hash, token_id, created_at, expires_at, "
                "last_seen_at) VALUES (?, ?, ?, ?, ?)",
                (id_hash, token_id, created_at, expires_at, created_at),
            )
            await db.execute(
                "DELETE FROM web_sessions WHERE token_id = ? AND id NOT IN "
                "(SELECT id FROM web_sessions WHERE token_id = ? ORDER BY id DESC LIMIT ?)",
                (token_id, token_id, keep),
            )

    async def web_session(self, id_hash: str) -> WebSession | None:
        row = await self._one(
            "SELECT s.id, s.created_at, s.expires_at, s.last_seen_at, "  # noqa: S608
            f"{_TOKEN_COLUMNS} "
            "FROM web_sessions s JOIN api_tokens t ON t.id = s.token_id "
            "LEFT JOIN users u ON u.id = t.user_id WHERE s.id_hash = ?",
            id_hash,
        )
        if row is None:
            return None
        return WebSession(row[0], _token(row[4:]), _t(row[1]), _t(row[2]), _t(row[3]))  # type: ignore[arg-type]

    async def touch_web_session(self, id_hash: str, when: datetime) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE web_sessions SET last_seen_at = ? WHERE id_hash = ?", (when, id_hash)
            )

    async def remove_web_session(self, id_hash: str) -> bool:
        async with self._transaction() as db:
            cur = await db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (id_hash,))
            return cur.rowcount > 0

    async def prune_web_sessions(self, now: datetime, idle_since: datetime) -> int:
        async with self._transaction() as db:
            cur = await db.execute(
                "DELETE FROM web_sessions WHERE expires_at <= ? OR last_seen_at <= ?",
                (now, idle_since),
            )
            return cur.rowcount

    async def ping(self) -> None:
        await self._one("SELECT 1 FROM schema_migrations LIMIT 1")


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
