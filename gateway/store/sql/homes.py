"""Each app's home node, in SQL: claimed by the first node that needs the app, gone with
its node's row (ON DELETE CASCADE: expiry or leaving) or released when the node drains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import NotFound
from ...models import Home
from .. import utcnow
from .base import ForeignKeyViolation, SQLBase

# Only a registered node takes a free home (the EXISTS; the foreign key refuses one whose
# row goes meanwhile); a taken one stays (the unique app_id settles a race: the loser's
# insert waits for the winner's commit, then does nothing). SQLite reads an upsert's
# INSERT ... SELECT only with a WHERE, which this one has.
CLAIM = """INSERT INTO app_homes (app_id, node, claimed_at)
           SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM nodes WHERE id = $2)
           ON CONFLICT (app_id) DO NOTHING"""
HOME = """SELECT h.node, n.name, n.address FROM app_homes h JOIN nodes n ON n.id = h.node
          WHERE h.app_id = $1"""
APP_EXISTS = "SELECT 1 AS found FROM apps WHERE id = $1"
HOMES = "SELECT app_id FROM app_homes WHERE node = $1 ORDER BY app_id"
RELEASE = "DELETE FROM app_homes WHERE node = $1"
RELEASE_SOME = "DELETE FROM app_homes WHERE node = $1 AND app_id {ids:$2}"


class HomesSQL(SQLBase):
    async def claim_home(self, app_id: int, node: str) -> Home | None:
        try:
            async with self._transaction():
                await self.execute(CLAIM, app_id, node, self.dialect.time(utcnow()))
                # A new statement: on PostgreSQL it sees a racing winner's committed row.
                home = await self.fetchrow(HOME, app_id)
                if home is not None:
                    return _home(home)
        except ForeignKeyViolation:
            # The app was removed, or the node declared gone, while the claim was made.
            pass
        if await self.fetchrow(APP_EXISTS, app_id) is None:
            raise NotFound(f"no such app (id {app_id})")
        return None

    async def home_of(self, app_id: int) -> Home | None:
        home = await self.fetchrow(HOME, app_id)
        return None if home is None else _home(home)

    async def homes_of(self, node: str) -> list[int]:
        return [int(r["app_id"]) for r in await self.fetch(HOMES, node)]

    async def release_homes(self, node: str, apps: Sequence[int] | None = None) -> int:
        async with self._transaction():
            if apps is None:
                return await self.execute(RELEASE, node)
            if not apps:
                return 0
            ids = self.dialect.array([int(a) for a in apps])
            return await self.execute(RELEASE_SOME, node, ids)


def _home(row: Any) -> Home:
    address = row["address"]
    return Home(str(row["node"]), str(row["name"]), None if address is None else str(address))
