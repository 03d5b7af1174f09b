"""Accounts, in SQL: create, list with their counts, remove (refused while they own apps)."""

from __future__ import annotations

from ...errors import Conflict
from ...models import User
from .. import UserSummary, rows, utcnow
from .base import USER, ForeignKeyViolation, SQLBase, UniqueViolation

CREATE = "INSERT INTO users (name, created_at) VALUES ($1, $2) RETURNING id, name, created_at"
LIST = """SELECT u.id, u.name, u.created_at,
                 (SELECT COUNT(*) FROM ssh_keys k WHERE k.user_id = u.id) AS keys,
                 (SELECT COUNT(*) FROM apps a WHERE a.owner_id = u.id) AS apps
            FROM users u ORDER BY u.name{bytes}"""
OWNED = "SELECT name FROM apps WHERE owner_id = $1 ORDER BY name{bytes}"
DELETE = "DELETE FROM users WHERE id = $1"


class UsersSQL(SQLBase):
    async def create_user(self, name: str) -> User:
        try:
            async with self._transaction():
                row = await self.fetchrow(CREATE, name, self.dialect.time(utcnow()))
        except UniqueViolation:
            raise Conflict(f"user '{name}' already exists") from None
        assert row is not None  # noqa: S101 - RETURNING gives the row inserted
        return rows.record(User, row)

    async def get_user(self, name: str) -> User:
        return await self._user_row(name)

    async def list_users(self) -> list[UserSummary]:
        found = await self.fetch(LIST)
        return [UserSummary(rows.record(User, r), int(r["keys"]), int(r["apps"])) for r in found]

    async def remove_user(self, name: str) -> User:
        try:
            async with self._transaction():
                user = await self._user_row(name)
                owned = await self.fetch(OWNED, user.id)
                if owned:
                    names = ", ".join(r["name"] for r in owned)
                    raise Conflict(f"user '{name}' owns apps ({names}): remove them first")
                await self.execute(DELETE, user.id)
        except ForeignKeyViolation:  # an app created for them meanwhile
            raise Conflict(f"user '{name}' owns apps: remove them first") from None
        return user


__all__ = ["USER", "UsersSQL"]
