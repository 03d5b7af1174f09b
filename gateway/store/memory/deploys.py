"""The memory store's deploy records: recorded, read, started and ended, their webhook
deliveries, and their retention."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from ...errors import NotFound
from ...models import Deploy, DeployStatus, NewDeploy, WebhookDelivery
from .. import rows, utcnow
from .apps import AppsMemory
from .base import Record, moment

OPEN = ("queued", "running")


class DeploysMemory(AppsMemory):
    def _insert_deploy(self, new: NewDeploy, now: datetime, origin: str | None) -> int:
        if new.app_id not in self._db.apps:
            raise NotFound(f"no app with id {new.app_id}")
        deploy_id = self._next_id("deploys")
        self._db.deploys[deploy_id] = {
            **dataclasses.asdict(new),
            "id": deploy_id,
            "status": "queued",
            "created_at": now,
            "origin": origin,
            "superseded_by": None,
            "exit_code": None,
            "reason": "",
            "status_token_hash": None,
            "started_at": None,
            "finished_at": None,
            "runner": None,
            "cancel_request": None,
            "report_status": None,
            "report_exit_code": None,
            "duration_ms": None,
            "log_seq": 0,
            "log_bytes": 0,
        }
        return deploy_id

    def _deploy(self, row: Record) -> Deploy:
        return rows.record(Deploy, row, app_name=self._db.apps[row["app_id"]]["name"])

    def _deploys(self, found: list[Record]) -> list[Deploy]:
        return [self._deploy(row) for row in sorted(found, key=lambda r: r["id"])]

    async def create_deploy(self, new: NewDeploy) -> Deploy:
        async with self._transaction():
            return self._deploy(self._db.deploys[self._insert_deploy(new, utcnow(), None)])

    async def get_deploy(self, deploy_id: int) -> Deploy | None:
        async with self._reading() as db:
            row = db.deploys.get(deploy_id)
            return None if row is None else self._deploy(row)

    async def list_deploys(self, app_name: str, limit: int = 20) -> list[Deploy]:
        async with self._reading() as db:
            app = self._app_named(app_name)
            found = self._deploys([r for r in db.deploys.values() if r["app_id"] == app.id])
            return found[::-1][:limit]

    async def app_deploy_ids(self, app_name: str) -> list[int]:
        async with self._reading() as db:
            app = self._app_named(app_name)
            return sorted(d for d, row in db.deploys.items() if row["app_id"] == app.id)

    async def reserve_deploy_ids(self, through: int) -> None:
        async with self._transaction():
            marks = self._db.marks
            marks["deploys"] = max(marks.get("deploys", 0), through)

    async def deploys_in(self, statuses: tuple[DeployStatus, ...]) -> list[Deploy]:
        wanted = {s.value for s in statuses}
        async with self._reading() as db:
            return self._deploys([r for r in db.deploys.values() if r["status"] in wanted])

    async def start_deploy(self, deploy_id: int, when: datetime) -> bool:
        async with self._transaction():
            row = self._db.deploys.get(deploy_id)
            if row is None or row["status"] != "queued":
                return False
            row.update(status="running", started_at=moment(when))
            return True

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
            row = self._db.deploys.get(deploy_id)
            if row is None or row["status"] not in OPEN:
                return False
            if superseded_by is not None and superseded_by not in self._db.deploys:
                raise NotFound(f"no deploy #{superseded_by}")
            row.update(
                status=status.value,
                finished_at=moment(when),
                exit_code=exit_code,
                reason=reason,
                superseded_by=superseded_by,
                duration_ms=duration_ms,
                cancel_request=None,
            )
        self._announce("done", deploy_id)
        return True

    async def prune_deploys(self, before: datetime, keep_last: int, limit: int = 500) -> list[int]:
        cutoff = moment(before)
        async with self._transaction():
            finished = [r for r in self._db.deploys.values() if r["status"] not in OPEN]
            kept: set[int] = set()
            for app_id in {r["app_id"] for r in finished}:
                own = sorted((r["id"] for r in finished if r["app_id"] == app_id), reverse=True)
                kept.update(own[:keep_last])
            ids = sorted(
                r["id"]
                for r in finished
                if r["id"] not in kept and (r["finished_at"] or r["created_at"]) < cutoff
            )[:limit]
            # A kept deploy may name a pruned one as its superseder: the link goes, the
            # reason text ("superseded by #N") stays.
            for row in self._db.deploys.values():
                if row["superseded_by"] in ids:
                    row["superseded_by"] = None
            self._drop_deploys(ids)
            return ids

    async def existing_deploy_ids(self, ids: list[int]) -> set[int]:
        async with self._reading() as db:
            return {i for i in ids if i in db.deploys}

    async def set_status_token(self, deploy_id: int, token_hash: str) -> None:
        async with self._transaction():
            row = self._db.deploys.get(deploy_id)
            if row is not None:
                row["status_token_hash"] = token_hash

    async def status_token_hash(self, deploy_id: int) -> str | None:
        async with self._reading() as db:
            row = db.deploys.get(deploy_id)
            return None if row is None else row["status_token_hash"]

    async def add_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        async with self._transaction():
            if delivery.deploy_id not in self._db.deploys:
                raise NotFound(f"no deploy #{delivery.deploy_id}")
            delivery_id = self._next_id("webhook_deliveries")
            self._db.deliveries[delivery_id] = {
                **dataclasses.asdict(delivery),
                "id": delivery_id,
                "created_at": moment(delivery.created_at),
            }

    async def webhook_deliveries(self, deploy_id: int) -> list[WebhookDelivery]:
        async with self._reading() as db:
            found = [r for r in db.deliveries.values() if r["deploy_id"] == deploy_id]
            found.sort(key=lambda r: (r["attempt"], r["id"]))
            return [rows.record(WebhookDelivery, r) for r in found]
