"""SSH keys, in SQL: a user's or an app's (deploy keys), one owner per key, limits, scopes."""

# Statements are built from the code's own constants and the models' field names, never
# from input: values always go as parameters.
# ruff: noqa: S608

from __future__ import annotations

from datetime import datetime

from ...errors import KeyInUse, KeyLimitReached
from ...keys import PublicKey
from ...models import SSHKey
from .. import KeyOwner, key_name_taken, rows, utcnow
from .base import Row, SQLBase, UniqueViolation

COLUMNS = (
    rows.select_list(
        SSHKey, "k", joined={"user_name": "u.name", "app_name": "ka.name", "scope": None}
    )
    + """, k.scoped AS scoped,
    (SELECT {lines:sa.name} FROM key_apps s JOIN apps sa ON sa.id = s.app_id
      WHERE s.key_id = k.id) AS scope_names"""
)
FROM = "FROM ssh_keys k LEFT JOIN users u ON u.id = k.user_id LEFT JOIN apps ka ON ka.id = k.app_id"
SELECT = f"SELECT {COLUMNS} {FROM}"
INSERT = """INSERT INTO ssh_keys (user_id, app_id, name, algorithm, bits, public_key, comment,
                fingerprint, fingerprint_md5, created_at, expires_at, access, scoped)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id"""
SCOPE = "INSERT INTO key_apps (key_id, app_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
# The owner's row locked (where rows lock): concurrent adds for it count one by one.
LOCK_OWNER = {
    "user_id": "SELECT 1 FROM users WHERE id = $1 {lock}",
    "app_id": "SELECT 1 FROM apps WHERE id = $1 {lock}",
}
COUNT = {
    "user_id": "SELECT count(*) AS n FROM ssh_keys WHERE user_id = $1",
    "app_id": "SELECT count(*) AS n FROM ssh_keys WHERE app_id = $1",
}
OWNED = {
    "user_id": f"{SELECT} WHERE k.user_id = $1 ORDER BY k.name{{bytes}}",
    "app_id": f"{SELECT} WHERE k.app_id = $1 ORDER BY k.name{{bytes}}",
}
NAMED = {
    "user_id": f"{SELECT} WHERE k.user_id = $1 AND k.name = $2 {{lock:k}}",
    "app_id": f"{SELECT} WHERE k.app_id = $1 AND k.name = $2 {{lock:k}}",
}
BY_ID = f"{SELECT} WHERE k.id = $1"
BY_FINGERPRINT = f"{SELECT} WHERE k.fingerprint = $1"
DELETE = "DELETE FROM ssh_keys WHERE id = $1"
TOUCH = "UPDATE ssh_keys SET last_used_at = $1 WHERE id = $2"


def key(row: Row) -> SSHKey:
    names = row["scope_names"]
    scope = None
    if row["scoped"]:
        scope = tuple(sorted(names.split("\n"))) if names else ()
    return rows.record(SSHKey, row, scope=scope)


class KeysSQL(SQLBase):
    async def add_key(
        self,
        user_name: str,
        key_name: str,
        key: PublicKey,
        expires_at: datetime | None = None,
        *,
        access: str | None = None,
        scope: list[str] | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        try:
            async with self._transaction():
                user = await self._user_row(user_name)
                owner = KeyOwner("user_id", user.id, user_name)
                apps = [await self._app_row(name) for name in scope or []]
                key_id = await self._add(owner, key, key_name, expires_at, access, scope, limit)
                for app in apps:
                    await self.execute(SCOPE, key_id, app.id)
                return await self._key_by_id(key_id)
        except UniqueViolation as exc:
            raise self._taken(exc, key_name_taken(False, user_name, key_name)) from None

    async def add_deploy_key(
        self,
        app_name: str,
        key_name: str,
        key: PublicKey,
        access: str,
        expires_at: datetime | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        try:
            async with self._transaction():
                app = await self._app_row(app_name)
                owner = KeyOwner("app_id", app.id, app_name)
                key_id = await self._add(owner, key, key_name, expires_at, access, None, limit)
                return await self._key_by_id(key_id)
        except UniqueViolation as exc:
            raise self._taken(exc, key_name_taken(True, app_name, key_name)) from None

    @staticmethod
    def _taken(exc: UniqueViolation, taken: Exception) -> Exception:
        """Another transaction registered the key or the name between our check and our
        insert: the refusal the check would have given."""
        return KeyInUse() if "fingerprint" in exc.constraint else taken

    async def _add(
        self,
        owner: KeyOwner,
        key: PublicKey,
        key_name: str,
        expires_at: datetime | None,
        access: str | None,
        scoped: list[str] | None,
        limit: int | None,
    ) -> int:
        """A user's or an app's new key, inside the caller's transaction; its id."""
        if limit is not None:
            await self.fetch(LOCK_OWNER[owner.column], owner.id)
            if int(await self.fetchval(COUNT[owner.column], owner.id)) >= limit:
                raise KeyLimitReached(owner.name, limit, deploy=owner.deploy)
        existing = await self.find_key(key.fingerprint)
        if existing is not None:
            owner.refuse(existing)
        key_id = await self.fetchval(
            INSERT,
            owner.id if owner.column == "user_id" else None,
            owner.id if owner.column == "app_id" else None,
            key_name,
            key.algorithm,
            key.bits,
            key.openssh,
            key.comment,
            key.fingerprint,
            key.fingerprint_md5,
            self.dialect.time(utcnow()),
            self.dialect.time(expires_at),
            access,
            int(scoped is not None),
        )
        return int(key_id)

    async def _key_by_id(self, key_id: int) -> SSHKey:
        row = await self.fetchrow(BY_ID, key_id)
        assert row is not None  # noqa: S101 - read in the transaction that added it
        return key(row)

    async def list_deploy_keys(self, app_name: str) -> list[SSHKey]:
        app = await self._app_row(app_name)
        return await self._owned_keys(KeyOwner("app_id", app.id, app_name))

    async def remove_deploy_key(self, app_name: str, key_name: str) -> SSHKey:
        async with self._transaction():
            app = await self._app_row(app_name)
            return await self._remove_owned(KeyOwner("app_id", app.id, app_name), key_name)

    async def list_keys(self, user_name: str) -> list[SSHKey]:
        user = await self._user_row(user_name)
        return await self._owned_keys(KeyOwner("user_id", user.id, user_name))

    async def remove_key(self, user_name: str, key_name: str) -> SSHKey:
        async with self._transaction():
            user = await self._user_row(user_name)
            return await self._remove_owned(KeyOwner("user_id", user.id, user_name), key_name)

    async def _owned_keys(self, owner: KeyOwner) -> list[SSHKey]:
        return [key(r) for r in await self.fetch(OWNED[owner.column], owner.id)]

    async def _remove_owned(self, owner: KeyOwner, key_name: str) -> SSHKey:
        row = await self.fetchrow(NAMED[owner.column], owner.id, key_name)
        if row is None:
            raise owner.missing(key_name)
        await self.execute(DELETE, row["id"])
        return key(row)

    async def find_key(self, fingerprint: str) -> SSHKey | None:
        row = await self.fetchrow(BY_FINGERPRINT, fingerprint)
        return None if row is None else key(row)

    async def touch_key(self, key_id: int, when: datetime) -> None:
        async with self._transaction():
            await self.execute(TOUCH, self.dialect.time(when), key_id)
