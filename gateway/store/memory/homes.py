"""The memory store's home nodes: each app's, claimed by the first registered node that
needs it, gone with its node or its app, released when the node drains."""

from __future__ import annotations

from ...errors import NotFound
from .. import utcnow
from .base import MemoryBase


class HomesMemory(MemoryBase):
    async def claim_home(self, app_id: int, node: str) -> str | None:
        async with self._transaction():
            db = self._db
            if app_id not in db.apps:
                raise NotFound(f"no such app (id {app_id})")
            found = db.homes.get(app_id)
            if found is not None:
                return str(found["node"])
            if node not in db.nodes:
                return None  # declared gone: it takes nothing until it has joined again
            db.homes[app_id] = {"app_id": app_id, "node": node, "claimed_at": utcnow()}
            return node

    async def home_of(self, app_id: int) -> str | None:
        async with self._reading() as db:
            found = db.homes.get(app_id)
            return None if found is None else str(found["node"])

    async def homes_of(self, node: str) -> list[int]:
        async with self._reading() as db:
            return sorted(a for a, row in db.homes.items() if row["node"] == node)

    async def release_homes(self, node: str) -> int:
        async with self._transaction():
            db = self._db
            mine = [a for a, row in db.homes.items() if row["node"] == node]
            for app_id in mine:
                del db.homes[app_id]
            return len(mine)
