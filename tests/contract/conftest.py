"""One registry contract, every backend: each test here runs against SQLite, PostgreSQL and
the memory store (gateway/store/memory/, the unit tests' double)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.store import Store, open_store
from gateway.store.memory import MemoryStore
from tests.helpers import keygen


@dataclass
class Backend:
    """A store under test, and a way around it (what an operator could do by hand)."""

    kind: str
    target: str
    store: Store

    async def open_another(self) -> Store:
        """Another store on the same registry, as another gateway process opens it."""
        if isinstance(self.store, MemoryStore):
            return self.store.sharing()
        return await open_store(self.target)

    async def execute(self, sql: str) -> None:
        """A statement run by hand on the database, beside the store (SQL backends only)."""
        if self.kind == "memory":
            raise TypeError("the memory store runs no SQL")
        if self.kind == "sqlite":

            def run() -> None:
                with sqlite3.connect(self.target) as db:
                    db.execute(sql)

            await asyncio.to_thread(run)
        else:
            import asyncpg

            conn = await asyncpg.connect(self.target)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()


BACKENDS = ["sqlite", "postgres", "memory"]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    store: Store
    if request.param == "memory":
        target, store = "memory", MemoryStore()
    else:
        if request.param == "sqlite":
            target = str(tmp_path / "db" / "gw.db")
        else:
            target = request.getfixturevalue("pg_url")
        store = await open_store(target)
    try:
        yield Backend(request.param, target, store)
    finally:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


@pytest.fixture(scope="module")
def pubkeys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("contractkeys")
    return [Path(f"{keygen(d / f'k{i}', 'ed25519')}.pub").read_text() for i in range(3)]
