"""What the SQL parts ask of a driver (one per engine), and the lookups they all share."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from ...errors import NotFound
from ...models import App, User
from .. import Store, rows
from .dialect import Dialect

Row = Mapping[str, Any]

USER = "SELECT id, name, created_at FROM users"
APP_COLUMNS = rows.select_list(App, "a", joined={"owner_name": "u.name"})
APP_FROM = "FROM apps a JOIN users u ON u.id = a.owner_id"


class UniqueViolation(Exception):
    """A statement broke a unique constraint; `constraint` names it as the engine does."""

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


class ForeignKeyViolation(Exception):
    """A statement (or a commit) broke a foreign key."""


class SQLBase(Store):
    """A registry kept by a SQL engine: a driver supplies the statements' execution, the
    per-aggregate parts (gateway/store/sql/*.py) supply the statements.

    Every method runs its statement in the task's open transaction if there is one; rows
    come back as mappings by column name. Constraint failures come out as UniqueViolation
    and ForeignKeyViolation, whatever the engine."""

    dialect: Dialect

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Every row of a statement (written as gateway/store/sql/dialect.py says)."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""

    @abc.abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Any]:
        """One transaction, or a savepoint inside the task's own (see Store.transaction)."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        found = await self.fetch(sql, *args)
        return found[0] if found else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else next(iter(row.values()))

    # -- what engines do their own way --

    async def notify(self, kind: str, deploy_id: int = 0) -> None:
        """Tell other processes of a deploy change when the transaction commits (where the
        engine carries messages)."""

    async def lock_claims(self, node_name: str) -> None:
        """Make claims under one node name wait for each other (where the engine's write
        transactions do not already)."""

    @abc.abstractmethod
    async def raise_id_mark(self, table: str, through: int) -> None:
        """Never hand out an id of `table` up to `through` (inside a transaction)."""

    # -- the schema, probes and copies --

    async def schema_version(self) -> int:
        found = await self.fetchval("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
        return int(found)

    async def ping(self) -> None:
        await self.fetch("SELECT 1 AS up FROM schema_migrations LIMIT 1")

    async def table_rows(self, table: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """Every row of a table, the named columns in key order (`db copy`). Table and
        column names come from the code's own list (transfer.TABLES), never from input."""
        found = await self.fetch(f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1, 2")  # noqa: S608
        return [tuple(row.values()) for row in found]

    # -- lookups every part uses --

    async def _user_row(self, name: str) -> User:
        row = await self.fetchrow(f"{USER} WHERE name = $1", name)
        if row is None:
            raise NotFound(f"no such user '{name}'")
        return rows.record(User, row)

    async def _app_row(self, name: str) -> App:
        app = await self.get_app(name)
        if app is None:
            raise NotFound(f"no such app '{name}'")
        return app

    async def _get_app(self, name: str) -> App | None:
        row = await self.fetchrow(f"SELECT {APP_COLUMNS} {APP_FROM} WHERE a.name = $1", name)
        return None if row is None else rows.record(App, row)
