"""The memory store's tables, its transactions and the lookups every part of it shares."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from ... import times
from ...errors import NotFound
from ...models import App, User
from .. import Store, rows

Record = dict[str, Any]  # one row, by column name, as the SQL tables hold it


@dataclasses.dataclass
class Tables:
    """Every table of the registry, by key; `marks` are the id high-water marks (an id is
    never handed out twice, as AUTOINCREMENT and identities guarantee)."""

    users: dict[int, Record] = dataclasses.field(default_factory=dict)
    keys: dict[int, Record] = dataclasses.field(default_factory=dict)
    key_apps: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    apps: dict[int, Record] = dataclasses.field(default_factory=dict)
    members: dict[tuple[int, int], Record] = dataclasses.field(default_factory=dict)
    deploys: dict[int, Record] = dataclasses.field(default_factory=dict)
    chunks: dict[tuple[int, int], Record] = dataclasses.field(default_factory=dict)
    deliveries: dict[int, Record] = dataclasses.field(default_factory=dict)
    audit: dict[int, Record] = dataclasses.field(default_factory=dict)
    tokens: dict[int, Record] = dataclasses.field(default_factory=dict)
    sessions: dict[int, Record] = dataclasses.field(default_factory=dict)
    nodes: dict[str, Record] = dataclasses.field(default_factory=dict)
    homes: dict[int, Record] = dataclasses.field(default_factory=dict)  # by app id
    marks: dict[str, int] = dataclasses.field(default_factory=dict)


class Registry:
    """What several memory stores may share, as processes share a database: the tables,
    and the one transaction that may write them at a time."""

    def __init__(self) -> None:
        self.tables = Tables()
        self.lock = asyncio.Lock()
        self.writer: asyncio.Task[Any] | None = None


def moment(value: datetime | str) -> datetime:
    """A time given to the store (an aware datetime, or its ISO 8601 text), as kept."""
    return value if isinstance(value, datetime) else times.parse(value)


class MemoryBase(Store):
    """A registry in this process's memory. Transactions work as on SQLite: one task writes
    at a time (the others wait, reads included); a block that raises puts the tables back
    as they were when it began, a nested block only its own part."""

    def __init__(self, registry: Registry | None = None) -> None:
        super().__init__()
        self._registry = registry or Registry()

    @property
    def _db(self) -> Tables:
        return self._registry.tables

    def _mine(self) -> bool:
        return self._registry.writer is asyncio.current_task()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        registry = self._registry
        if self._mine():
            async with self._undone_if_raising():
                yield
            return
        async with registry.lock:
            registry.writer = asyncio.current_task()
            try:
                async with self._undone_if_raising():
                    yield
            finally:
                registry.writer = None

    @contextlib.asynccontextmanager
    async def _undone_if_raising(self) -> AsyncIterator[None]:
        registry = self._registry
        saved = copy.deepcopy(registry.tables)
        try:
            yield
        except BaseException:
            registry.tables = saved
            raise

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[Tables]:
        """The tables, once no other task is inside a transaction (its changes unseen)."""
        if self._mine():
            yield self._db
            return
        async with self._registry.lock:
            yield self._db

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction()

    def _next_id(self, table: str) -> int:
        marks = self._db.marks
        marks[table] = marks.get(table, 0) + 1
        return marks[table]

    def _drop_orphan_homes(self) -> None:
        """Homes go with their app and with their node (ON DELETE CASCADE in SQL)."""
        db = self._db
        db.homes = {
            a: row for a, row in db.homes.items() if a in db.apps and row["node"] in db.nodes
        }

    # -- lookups every part uses --

    def _user_named(self, name: str) -> User:
        for row in self._db.users.values():
            if row["name"] == name:
                return rows.record(User, row)
        raise NotFound(f"no such user '{name}'")

    def _app(self, row: Record) -> App:
        return rows.record(App, row, owner_name=self._db.users[row["owner_id"]]["name"])

    def _app_named(self, name: str) -> App:
        found = self._find_app(name)
        if found is None:
            raise NotFound(f"no such app '{name}'")
        return found

    def _find_app(self, name: str) -> App | None:
        for row in self._db.apps.values():
            if row["name"] == name:
                return self._app(row)
        return None
