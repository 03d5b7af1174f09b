"""The audit trail, in SQL: events newest first, by app and by user, pruned oldest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ...models import AuditEvent
from .. import rows, utcnow
from .base import SQLBase

ADD = """INSERT INTO audit_events (at, event, actor, fingerprint, source, app, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)"""
PRUNE = """DELETE FROM audit_events WHERE id IN
           (SELECT id FROM audit_events WHERE at < $1 ORDER BY at, id LIMIT $2)"""
COLUMNS = rows.select_list(AuditEvent, "e")


class AuditSQL(SQLBase):
    async def add_audit(self, event: AuditEvent) -> None:
        async with self._transaction():
            await self.execute(
                ADD,
                self.dialect.time(event.at or utcnow()),
                event.event,
                event.actor,
                event.fingerprint,
                event.source,
                event.app,
                event.detail,
            )

    async def prune_audit(self, before: datetime, limit: int = 5000) -> int:
        async with self._transaction():
            return await self.execute(PRUNE, self.dialect.time(before), limit)

    async def list_audit(
        self, app: str | None = None, actor: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        clauses: list[str] = []
        args: list[Any] = []
        if app is not None:
            args.append(app)
            clauses.append(f"e.app = ${len(args)}")
        if actor is not None:
            # Events by the user, and operator events about them (detail.user).
            args.append(actor)
            clauses.append(f"(e.actor = ${len(args)} OR {{json:e.detail.user}} = ${len(args)})")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        args.append(limit)
        found = await self.fetch(
            f"SELECT {COLUMNS} FROM audit_events e {where} ORDER BY e.id DESC LIMIT ${len(args)}",  # noqa: S608 - clauses are the code's own
            *args,
        )
        return [rows.record(AuditEvent, r) for r in found]
