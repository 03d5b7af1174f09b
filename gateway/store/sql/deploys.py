"""Deploy records, in SQL: recorded, read, started and ended, their webhook deliveries, and
their retention."""

# Statements are built from the code's own constants and the models' field names, never
# from input: values always go as parameters.
# ruff: noqa: S608

from __future__ import annotations

import dataclasses
from datetime import datetime

from ...models import Deploy, DeployStatus, NewDeploy, WebhookDelivery
from .. import rows, utcnow
from .base import Row, SQLBase

# A column of deploys is read (and, if a push provides it, written) by being a field of
# Deploy (and NewDeploy): nothing here names it.
COLUMNS = rows.select_list(Deploy, "d", joined={"app_name": "a.name"})
FROM = "FROM deploys d JOIN apps a ON a.id = d.app_id"
SELECT = f"SELECT {COLUMNS} {FROM}"
_NEW = rows.field_names(NewDeploy)
INSERT = (
    f"INSERT INTO deploys ({', '.join(_NEW)}, status, created_at, origin) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_NEW) + 1))}, 'queued', "
    f"${len(_NEW) + 1}, ${len(_NEW) + 2}) RETURNING id"
)
BY_ID = f"{SELECT} WHERE d.id = $1"
BY_IDS = f"{SELECT} WHERE d.id {{ids:$1}} ORDER BY d.id"
OF_APP = f"{SELECT} WHERE d.app_id = $1 ORDER BY d.id DESC LIMIT $2"
IN_STATES = f"{SELECT} WHERE d.status {{texts:$1}} ORDER BY d.id"
APP_IDS = "SELECT id FROM deploys WHERE app_id = $1 ORDER BY id"
EXISTING = "SELECT id FROM deploys WHERE id {ids:$1}"
START = """UPDATE deploys SET status = 'running', started_at = $1
            WHERE id = $2 AND status = 'queued'"""
FINISH = """UPDATE deploys SET status = $1, finished_at = $2, exit_code = $3, reason = $4,
                   superseded_by = $5, duration_ms = $6, cancel_request = NULL
             WHERE id = $7 AND status IN ('queued', 'running')"""
# Finished deploys that ended before $1, except each app's $2 newest finished ones.
PRUNABLE = """SELECT d.id FROM deploys d
               WHERE d.status NOT IN ('queued', 'running')
                 AND COALESCE(d.finished_at, d.created_at) < $1
                 AND d.id NOT IN (
                     SELECT id FROM (
                         SELECT id, ROW_NUMBER() OVER (PARTITION BY app_id ORDER BY id DESC)
                                AS newest
                           FROM deploys WHERE status NOT IN ('queued', 'running')) ranked
                      WHERE newest <= $2)
               ORDER BY d.id LIMIT $3"""
# A kept deploy may name a pruned one as its superseder: the link goes, the reason text
# ("superseded by #N") stays.
UNLINK = "UPDATE deploys SET superseded_by = NULL WHERE superseded_by {ids:$1}"
DELETE = "DELETE FROM deploys WHERE id {ids:$1} RETURNING id"
SET_TOKEN = "UPDATE deploys SET status_token_hash = $1 WHERE id = $2"  # noqa: S105
TOKEN = "SELECT status_token_hash FROM deploys WHERE id = $1"  # noqa: S105
DELIVERY_FIELDS = rows.field_names(WebhookDelivery)
ADD_DELIVERY = (
    f"INSERT INTO webhook_deliveries ({', '.join(DELIVERY_FIELDS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(DELIVERY_FIELDS) + 1))})"
)
DELIVERIES = (
    f"SELECT {rows.select_list(WebhookDelivery, 'w')} FROM webhook_deliveries w "
    "WHERE w.deploy_id = $1 ORDER BY w.attempt, w.id"
)


def deploy(row: Row) -> Deploy:
    return rows.record(Deploy, row)


class DeploysSQL(SQLBase):
    async def _insert_deploy(self, new: NewDeploy, now: datetime, origin: str | None) -> int:
        values = [getattr(new, name) for name in _NEW]
        return int(await self.fetchval(INSERT, *values, self.dialect.time(now), origin))

    async def _deploys(self, sql: str, *args: object) -> list[Deploy]:
        return [deploy(r) for r in await self.fetch(sql, *args)]

    async def create_deploy(self, new: NewDeploy) -> Deploy:
        async with self._transaction():
            deploy_id = await self._insert_deploy(new, utcnow(), None)
            found = await self.get_deploy(deploy_id)
        assert found is not None  # noqa: S101 - read in the transaction that added it
        return found

    async def get_deploy(self, deploy_id: int) -> Deploy | None:
        row = await self.fetchrow(BY_ID, deploy_id)
        return None if row is None else deploy(row)

    async def list_deploys(self, app_name: str, limit: int = 20) -> list[Deploy]:
        app = await self._app_row(app_name)
        return await self._deploys(OF_APP, app.id, limit)

    async def app_deploy_ids(self, app_name: str) -> list[int]:
        app = await self._app_row(app_name)
        return [int(r["id"]) for r in await self.fetch(APP_IDS, app.id)]

    async def reserve_deploy_ids(self, through: int) -> None:
        async with self._transaction():
            await self.raise_id_mark("deploys", through)

    async def deploys_in(self, statuses: tuple[DeployStatus, ...]) -> list[Deploy]:
        return await self._deploys(IN_STATES, self.dialect.array([s.value for s in statuses]))

    async def start_deploy(self, deploy_id: int, when: datetime) -> bool:
        async with self._transaction():
            return await self.execute(START, self.dialect.time(when), deploy_id) == 1

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
        async with self._transaction():
            changed = await self.execute(
                FINISH,
                status.value,
                self.dialect.time(when),
                exit_code,
                reason,
                superseded_by,
                duration_ms,
                deploy_id,
            )
            if changed:
                await self.notify("done", deploy_id)
        if changed:
            self._announce("done", deploy_id)
        return changed == 1

    async def prune_deploys(self, before: datetime, keep_last: int, limit: int = 500) -> list[int]:
        async with self._transaction():
            found = await self.fetch(PRUNABLE, self.dialect.time(before), keep_last, limit)
            ids = [int(r["id"]) for r in found]
            if not ids:
                return []
            await self.execute(UNLINK, self.dialect.array(ids))
            deleted = await self.fetch(DELETE, self.dialect.array(ids))
        return sorted(int(r["id"]) for r in deleted)

    async def existing_deploy_ids(self, ids: list[int]) -> set[int]:
        if not ids:
            return set()
        return {int(r["id"]) for r in await self.fetch(EXISTING, self.dialect.array(ids))}

    async def set_status_token(self, deploy_id: int, token_hash: str) -> None:
        async with self._transaction():
            await self.execute(SET_TOKEN, token_hash, deploy_id)

    async def status_token_hash(self, deploy_id: int) -> str | None:
        found = await self.fetchval(TOKEN, deploy_id)
        return None if found is None else str(found)

    async def add_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        values = dataclasses.asdict(delivery)
        values["created_at"] = self.dialect.time(delivery.created_at)
        async with self._transaction():
            await self.execute(ADD_DELIVERY, *(values[name] for name in DELIVERY_FIELDS))

    async def webhook_deliveries(self, deploy_id: int) -> list[WebhookDelivery]:
        found = await self.fetch(DELIVERIES, deploy_id)
        return [rows.record(WebhookDelivery, r) for r in found]
