"""API tokens and the keys page's sessions, in SQL (only hashes of either are stored)."""

# Statements are built from the code's own constants and the models' field names, never
# from input: values always go as parameters.
# ruff: noqa: S608

from __future__ import annotations

from datetime import datetime

from ...errors import Conflict, NotFound
from ...models import ApiToken
from .. import WebSession, rows, utcnow
from .base import SQLBase, UniqueViolation

COLUMNS = rows.select_list(ApiToken, "t", joined={"user_name": "u.name"})
FROM = "FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id"
SELECT = f"SELECT {COLUMNS} {FROM}"
CREATE = """INSERT INTO api_tokens (name, user_id, token_hash, created_at, expires_at)
            VALUES ($1, $2, $3, $4, $5) RETURNING id"""
BY_ID = f"{SELECT} WHERE t.id = $1"
BY_NAME = f"{SELECT} WHERE t.name = $1"
BY_HASH = f"{SELECT} WHERE t.token_hash = $1"
LIST = f"{SELECT} ORDER BY t.name{{bytes}}"
DELETE = "DELETE FROM api_tokens WHERE id = $1"
TOUCH = "UPDATE api_tokens SET last_used_at = $1 WHERE id = $2"

SESSION = f"""SELECT s.id, s.created_at, s.expires_at, s.last_seen_at,
                     {rows.select_list(ApiToken, "t", "token_", joined={"user_name": "u.name"})}
                FROM web_sessions s JOIN api_tokens t ON t.id = s.token_id
                LEFT JOIN users u ON u.id = t.user_id WHERE s.id_hash = $1"""
CREATE_SESSION = """INSERT INTO web_sessions (id_hash, token_id, created_at, expires_at,
                        last_seen_at) VALUES ($1, $2, $3, $4, $3)"""
# The token's oldest sessions beyond the newest `keep` end.
TRIM_SESSIONS = """DELETE FROM web_sessions WHERE token_id = $1 AND id NOT IN
                   (SELECT id FROM web_sessions WHERE token_id = $1 ORDER BY id DESC LIMIT $2)"""
TOUCH_SESSION = "UPDATE web_sessions SET last_seen_at = $1 WHERE id_hash = $2"
DELETE_SESSION = "DELETE FROM web_sessions WHERE id_hash = $1"
PRUNE_SESSIONS = "DELETE FROM web_sessions WHERE expires_at <= $1 OR last_seen_at <= $2"


class TokensSQL(SQLBase):
    async def create_token(
        self,
        name: str,
        user_name: str | None,
        token_hash: str,
        expires_at: datetime | None = None,
    ) -> ApiToken:
        time = self.dialect.time
        try:
            async with self._transaction():
                user_id = None if user_name is None else (await self._user_row(user_name)).id
                token_id = await self.fetchval(
                    CREATE, name, user_id, token_hash, time(utcnow()), time(expires_at)
                )
                token = await self._token(BY_ID, token_id)
        except UniqueViolation:
            raise Conflict(f"a token named '{name}' already exists") from None
        assert token is not None  # noqa: S101 - read in the transaction that added it
        return token

    async def _token(self, sql: str, value: object) -> ApiToken | None:
        row = await self.fetchrow(sql, value)
        return None if row is None else rows.record(ApiToken, row)

    async def list_tokens(self) -> list[ApiToken]:
        return [rows.record(ApiToken, r) for r in await self.fetch(LIST)]

    async def remove_token(self, name: str) -> ApiToken:
        async with self._transaction():
            token = await self._token(BY_NAME, name)
            if token is None:
                raise NotFound(f"no token named '{name}'")
            await self.execute(DELETE, token.id)
        return token

    async def token_by_hash(self, token_hash: str) -> ApiToken | None:
        return await self._token(BY_HASH, token_hash)

    async def touch_token(self, token_id: int, when: datetime) -> None:
        async with self._transaction():
            await self.execute(TOUCH, self.dialect.time(when), token_id)

    # -- keys page sessions --

    async def create_web_session(
        self, id_hash: str, token_id: int, created_at: datetime, expires_at: datetime, keep: int
    ) -> None:
        time = self.dialect.time
        async with self._transaction():
            created, expires = time(created_at), time(expires_at)
            await self.execute(CREATE_SESSION, id_hash, token_id, created, expires)
            await self.execute(TRIM_SESSIONS, token_id, keep)

    async def web_session(self, id_hash: str) -> WebSession | None:
        row = await self.fetchrow(SESSION, id_hash)
        if row is None:
            return None
        token = rows.record(ApiToken, row, "token_")
        return rows.record(WebSession, row, token=token)

    async def touch_web_session(self, id_hash: str, when: datetime) -> None:
        async with self._transaction():
            await self.execute(TOUCH_SESSION, self.dialect.time(when), id_hash)

    async def remove_web_session(self, id_hash: str) -> bool:
        async with self._transaction():
            return await self.execute(DELETE_SESSION, id_hash) > 0

    async def prune_web_sessions(self, now: datetime, idle_since: datetime) -> int:
        time = self.dialect.time
        async with self._transaction():
            return await self.execute(PRUNE_SESSIONS, time(now), time(idle_since))
