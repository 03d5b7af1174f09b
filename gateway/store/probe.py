"""Look at the configured registry without changing it: what `git-gateway check` reports.

`serve` opens the registry and applies pending migrations; `check` (the systemd unit's
ExecStartPre, or an operator before an upgrade) must not: an older gateway may still be
running on that database, and a mistyped path must not leave an empty registry behind. So a
SQLite file is read through a read-only connection (a missing one is reported as created on
first start, once its directory is found writable), and PostgreSQL gets one connection and
two reads. Either way, the answer is one line; a failure names the database (password
masked) and the reason.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..dburl import is_postgres, redact
from ..errors import StoreUnavailable

CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class RegistryState:
    kind: str  # "sqlite" or "postgresql"
    where: str  # a path, or host:port/database (never a password)
    schema: int | None  # the newest migration applied; None: nothing there yet
    latest: int  # the newest migration this version ships

    def text(self) -> str:
        if self.schema is None:
            return f"registry ok ({self.kind} {self.where}: created on first start)"
        state = f"schema {self.schema}"
        if self.schema < self.latest:
            state += f", {self.latest - self.schema} migration(s) pending: applied at start"
        elif self.schema > self.latest:
            state += f", newer than this version's {self.latest}"
        return f"registry ok ({self.kind} {self.where}, {state})"


async def probe(database: Path | str) -> RegistryState:
    """The registry's state; StoreUnavailable with one line when it cannot be used."""
    text = str(database)
    if is_postgres(text):
        return await _postgres(text)
    return await asyncio.to_thread(_sqlite, Path(text))


# -- SQLite --


def _sqlite(path: Path) -> RegistryState:
    from .sqlite import migrations, too_old

    latest = len(migrations())
    if reason := too_old():
        raise _sqlite_refused(path, reason)
    if not path.exists():
        _creatable(path)
        return RegistryState("sqlite", str(path), None, latest)
    if not path.is_file():
        raise _sqlite_refused(path, "not a regular file")
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        raise _sqlite_refused(path, "the file and its directory must be writable by the gateway")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?{_read_only(path)}", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise _sqlite_refused(path, str(exc)) from None
    try:
        return RegistryState("sqlite", str(path), _sqlite_schema(db, path), latest)
    finally:
        db.close()


def _read_only(path: Path) -> str:
    """How to open the file without writing anything next to it. A registry in use (or left
    by a crash) has its -wal and -shm files: read through them. One closed cleanly has none,
    and all its content is in the file: read it as immutable, which creates no -shm (made by
    `check` run as root, one would lock the service's own user out of the registry)."""
    in_use = all(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm"))
    return "mode=ro" if in_use else "immutable=1"


def _sqlite_schema(db: sqlite3.Connection, path: Path) -> int | None:
    try:
        found = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).fetchone()
        if found is None:
            return None if _empty(db) else _not_ours(path)
        row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    except sqlite3.Error as exc:
        raise _sqlite_refused(path, str(exc)) from None
    return int(row[0] or 0)


def _empty(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0


def _not_ours(path: Path) -> int:
    raise _sqlite_refused(path, "a SQLite database without the gateway's schema_migrations")


def _creatable(path: Path) -> None:
    """A missing registry file: `serve` creates it (and its missing directories) under the
    nearest existing directory, which must be one the gateway can write."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _sqlite_refused(path, f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _sqlite_refused(path, f"it does not exist and {parent} is not writable")


def _sqlite_refused(path: Path, reason: str) -> StoreUnavailable:
    return StoreUnavailable(f"registry unusable: sqlite {path}: {reason}")


# -- PostgreSQL --


async def _postgres(url: str) -> RegistryState:
    import asyncpg  # type: ignore[import-untyped]

    from .postgres import migrations

    where = _where(url)
    try:
        conn = await asyncpg.connect(
            url, timeout=CONNECT_TIMEOUT, server_settings={"application_name": "git-gateway"}
        )
    except ValueError as exc:
        raise StoreUnavailable(f"invalid registry URL {redact(url)}: {exc}") from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StoreUnavailable(f"cannot reach the registry at {redact(url)}: {reason}") from None
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        schema = None
        if exists:
            schema = int(
                await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailable(f"the registry at {redact(url)} cannot be read: {exc}") from None
    finally:
        await conn.close()
    return RegistryState("postgresql", where, schema, len(migrations()))


def _where(url: str) -> str:
    """host:port/database of a URL, as an operator names it (no user, no password)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return redact(url)
    database = parts.path.lstrip("/")
    if not host or not database:
        return redact(url)  # a socket directory or a database given in the query
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}{f':{port}' if port else ''}/{database}"
