"""The memory store's API tokens, keys page sessions and audit trail."""

from __future__ import annotations

import json
from datetime import datetime

from ...errors import Conflict, NotFound
from ...models import ApiToken, AuditEvent
from .. import WebSession, rows, utcnow
from .base import MemoryBase, Record, moment


class TokensMemory(MemoryBase):
    def _token(self, row: Record) -> ApiToken:
        user = None if row["user_id"] is None else self._db.users[row["user_id"]]["name"]
        return rows.record(ApiToken, row, user_name=user)

    def _token_where(self, column: str, value: object) -> ApiToken | None:
        for row in self._db.tokens.values():
            if row[column] == value:
                return self._token(row)
        return None

    async def create_token(
        self,
        name: str,
        user_name: str | None,
        token_hash: str,
        expires_at: datetime | None = None,
    ) -> ApiToken:
        async with self._transaction():
            user_id = None if user_name is None else self._user_named(user_name).id
            taken = self._token_where("name", name) or self._token_where("token_hash", token_hash)
            if taken is not None:
                raise Conflict(f"a token named '{name}' already exists")
            token_id = self._next_id("api_tokens")
            self._db.tokens[token_id] = {
                "id": token_id,
                "name": name,
                "user_id": user_id,
                "token_hash": token_hash,
                "created_at": utcnow(),
                "last_used_at": None,
                "expires_at": None if expires_at is None else moment(expires_at),
            }
            return self._token(self._db.tokens[token_id])

    async def list_tokens(self) -> list[ApiToken]:
        async with self._reading() as db:
            return [self._token(r) for r in sorted(db.tokens.values(), key=lambda r: r["name"])]

    async def remove_token(self, name: str) -> ApiToken:
        async with self._transaction():
            token = self._token_where("name", name)
            if token is None:
                raise NotFound(f"no token named '{name}'")
            db = self._db
            del db.tokens[token.id]
            db.sessions = {s: row for s, row in db.sessions.items() if row["token_id"] != token.id}
            return token

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        async with self._reading():
            return self._token_where("token_hash", token_hash)

    async def touch_token(self, token_id: int, when: datetime) -> None:
        async with self._transaction():
            row = self._db.tokens.get(token_id)
            if row is not None:
                row["last_used_at"] = moment(when)

    # -- keys page sessions --

    async def create_web_session(
        self, id_hash: str, token_id: int, created_at: datetime, expires_at: datetime, keep: int
    ) -> None:
        async with self._transaction():
            db = self._db
            if token_id not in db.tokens:
                raise NotFound(f"no token with id {token_id}")
            if any(row["id_hash"] == id_hash for row in db.sessions.values()):
                raise Conflict("this session exists already")
            session_id = self._next_id("web_sessions")
            db.sessions[session_id] = {
                "id": session_id,
                "id_hash": id_hash,
                "token_id": token_id,
                "created_at": moment(created_at),
                "expires_at": moment(expires_at),
                "last_seen_at": moment(created_at),
            }
            # The token's oldest sessions beyond the newest `keep` end.
            own = sorted((s for s, r in db.sessions.items() if r["token_id"] == token_id))
            for session in own[: max(len(own) - keep, 0)]:
                del db.sessions[session]

    def _session(self, id_hash: str) -> Record | None:
        for row in self._db.sessions.values():
            if row["id_hash"] == id_hash:
                return row
        return None

    async def web_session(self, id_hash: str) -> WebSession | None:
        async with self._reading() as db:
            row = self._session(id_hash)
            if row is None:
                return None
            return rows.record(WebSession, row, token=self._token(db.tokens[row["token_id"]]))

    async def touch_web_session(self, id_hash: str, when: datetime) -> None:
        async with self._transaction():
            row = self._session(id_hash)
            if row is not None:
                row["last_seen_at"] = moment(when)

    async def remove_web_session(self, id_hash: str) -> bool:
        async with self._transaction():
            row = self._session(id_hash)
            if row is None:
                return False
            del self._db.sessions[row["id"]]
            return True

    async def prune_web_sessions(self, now: datetime, idle_since: datetime) -> int:
        end, idle = moment(now), moment(idle_since)
        async with self._transaction():
            db = self._db
            gone = [
                s
                for s, row in db.sessions.items()
                if row["expires_at"] <= end or row["last_seen_at"] <= idle
            ]
            for session in gone:
                del db.sessions[session]
            return len(gone)


class AuditMemory(MemoryBase):
    async def add_audit(self, event: AuditEvent) -> None:
        detail = json.loads(event.detail)
        if not isinstance(detail, dict):
            raise ValueError(f"an audit event's detail is a JSON object, not {event.detail!r}")
        async with self._transaction():
            event_id = self._next_id("audit_events")
            self._db.audit[event_id] = {
                "id": event_id,
                "at": moment(event.at or utcnow()),
                "event": event.event,
                "actor": event.actor,
                "fingerprint": event.fingerprint,
                "source": event.source,
                "app": event.app,
                "detail": event.detail,
            }

    async def prune_audit(self, before: datetime, limit: int = 5000) -> int:
        cutoff = moment(before)
        async with self._transaction():
            db = self._db
            old = sorted((r["at"], e) for e, r in db.audit.items() if r["at"] < cutoff)
            for _, event_id in old[:limit]:
                del db.audit[event_id]
            return len(old[:limit])

    async def list_audit(
        self, app: str | None = None, actor: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        def wanted(row: Record) -> bool:
            if app is not None and row["app"] != app:
                return False
            # Events by the user, and operator events about them (detail.user).
            return actor is None or actor in (row["actor"], json.loads(row["detail"]).get("user"))

        async with self._reading() as db:
            found = [db.audit[e] for e in sorted(db.audit, reverse=True) if wanted(db.audit[e])]
            return [rows.record(AuditEvent, row) for row in found[:limit]]
