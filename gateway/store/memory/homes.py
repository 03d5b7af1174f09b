"""The memory store's home nodes: each app's, claimed by the first registered node that
needs it, gone with its node or its app, released when the node drains."""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import NotFound
from ...models import Home
from .. import utcnow
from .base import MemoryBase


class HomesMemory(MemoryBase):
    async def claim_home(self, app_id: int, node: str) -> Home | None:
        async with self._transaction():
            db = self._db
            if app_id not in db.apps:
                raise NotFound(f"no such app (id {app_id})")
            found = db.homes.get(app_id)
            if found is not None:
                return self._home(str(found["node"]))
            if node not in db.nodes:
                return None  # declared gone: it takes nothing until it has joined again
            db.homes[app_id] = {"app_id": app_id, "node": node, "claimed_at": utcnow()}
            return self._home(node)

    async def home_of(self, app_id: int) -> Home | None:
        async with self._reading() as db:
            found = db.homes.get(app_id)
            return None if found is None else self._home(str(found["node"]))

    def _home(self, node: str) -> Home:
        row = self._db.nodes[node]
        return Home(node, str(row["name"]), row.get("address"))

    async def homes_of(self, node: str) -> list[int]:
        async with self._reading() as db:
            return sorted(a for a, row in db.homes.items() if row["node"] == node)

    async def release_homes(self, node: str, apps: Sequence[int] | None = None) -> int:
        async with self._transaction():
            db = self._db
            mine = [
                a
                for a, row in db.homes.items()
                if row["node"] == node and (apps is None or a in apps)
            ]
            for app_id in mine:
                del db.homes[app_id]
            return len(mine)
