"""The memory store's accounts and SSH keys (one key, one owner; limits; scopes)."""

from __future__ import annotations

from datetime import datetime

from ...errors import Conflict, KeyLimitReached
from ...keys import PublicKey
from ...models import SSHKey, User
from .. import KeyOwner, UserSummary, rows, utcnow
from .base import MemoryBase, Record, moment


class AccountsMemory(MemoryBase):
    # -- users --

    async def create_user(self, name: str) -> User:
        async with self._transaction():
            if any(row["name"] == name for row in self._db.users.values()):
                raise Conflict(f"user '{name}' already exists")
            user_id = self._next_id("users")
            self._db.users[user_id] = {"id": user_id, "name": name, "created_at": utcnow()}
            return self._user_named(name)

    async def get_user(self, name: str) -> User:
        async with self._reading():
            return self._user_named(name)

    async def list_users(self) -> list[UserSummary]:
        async with self._reading() as db:
            return [
                UserSummary(
                    rows.record(User, row),
                    sum(1 for k in db.keys.values() if k["user_id"] == row["id"]),
                    sum(1 for a in db.apps.values() if a["owner_id"] == row["id"]),
                )
                for row in sorted(db.users.values(), key=lambda r: r["name"])
            ]

    async def remove_user(self, name: str) -> User:
        async with self._transaction():
            user = self._user_named(name)
            db = self._db
            owned = sorted(a["name"] for a in db.apps.values() if a["owner_id"] == user.id)
            if owned:
                raise Conflict(f"user '{name}' owns apps ({', '.join(owned)}): remove them first")
            del db.users[user.id]
            # What goes with the account: its keys, memberships, tokens and their sessions.
            self._drop_keys([k for k, row in db.keys.items() if row["user_id"] == user.id])
            db.members = {k: v for k, v in db.members.items() if k[1] != user.id}
            self._drop_tokens([t for t, row in db.tokens.items() if row["user_id"] == user.id])
            return user

    def _drop_keys(self, ids: list[int]) -> None:
        db = self._db
        for key_id in ids:
            del db.keys[key_id]
        db.key_apps = {pair for pair in db.key_apps if pair[0] not in ids}

    def _drop_tokens(self, ids: list[int]) -> None:
        db = self._db
        for token_id in ids:
            del db.tokens[token_id]
        db.sessions = {s: row for s, row in db.sessions.items() if row["token_id"] not in ids}

    # -- keys --

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
        async with self._transaction():
            user = self._user_named(user_name)
            apps = [self._app_named(name) for name in scope or []]
            owner = KeyOwner("user_id", user.id, user_name)
            key_id = self._add(owner, key, key_name, expires_at, access, scope, limit)
            self._db.key_apps.update((key_id, app.id) for app in apps)
            return self._key(self._db.keys[key_id])

    async def add_deploy_key(
        self,
        app_name: str,
        key_name: str,
        key: PublicKey,
        access: str,
        expires_at: datetime | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        async with self._transaction():
            app = self._app_named(app_name)
            owner = KeyOwner("app_id", app.id, app_name)
            key_id = self._add(owner, key, key_name, expires_at, access, None, limit)
            return self._key(self._db.keys[key_id])

    def _add(
        self,
        owner: KeyOwner,
        key: PublicKey,
        key_name: str,
        expires_at: datetime | None,
        access: str | None,
        scoped: list[str] | None,
        limit: int | None,
    ) -> int:
        db = self._db
        owned = [row for row in db.keys.values() if row[owner.column] == owner.id]
        if limit is not None and len(owned) >= limit:
            raise KeyLimitReached(owner.name, limit, deploy=owner.deploy)
        for row in db.keys.values():
            if row["fingerprint"] == key.fingerprint:
                owner.refuse(self._key(row))
        if any(row["name"] == key_name for row in owned):
            raise owner.name_taken(key_name)
        key_id = self._next_id("ssh_keys")
        db.keys[key_id] = {
            "id": key_id,
            "user_id": owner.id if owner.column == "user_id" else None,
            "app_id": owner.id if owner.column == "app_id" else None,
            "name": key_name,
            "algorithm": key.algorithm,
            "bits": key.bits,
            "public_key": key.openssh,
            "comment": key.comment,
            "fingerprint": key.fingerprint,
            "fingerprint_md5": key.fingerprint_md5,
            "created_at": utcnow(),
            "last_used_at": None,
            "expires_at": None if expires_at is None else moment(expires_at),
            "access": access,
            "scoped": scoped is not None,
        }
        return key_id

    def _key(self, row: Record) -> SSHKey:
        db = self._db
        scope = None
        if row["scoped"]:
            scope = tuple(sorted(db.apps[a]["name"] for k, a in db.key_apps if k == row["id"]))
        user = db.users.get(row["user_id"]) if row["user_id"] is not None else None
        app = db.apps.get(row["app_id"]) if row["app_id"] is not None else None
        return rows.record(
            SSHKey,
            row,
            user_name=None if user is None else user["name"],
            app_name=None if app is None else app["name"],
            scope=scope,
        )

    def _owned(self, owner: KeyOwner) -> list[Record]:
        found = [row for row in self._db.keys.values() if row[owner.column] == owner.id]
        return sorted(found, key=lambda row: row["name"])

    async def list_deploy_keys(self, app_name: str) -> list[SSHKey]:
        async with self._reading():
            app = self._app_named(app_name)
            return [self._key(r) for r in self._owned(KeyOwner("app_id", app.id, app_name))]

    async def remove_deploy_key(self, app_name: str, key_name: str) -> SSHKey:
        async with self._transaction():
            app = self._app_named(app_name)
            return self._remove_owned(KeyOwner("app_id", app.id, app_name), key_name)

    async def list_keys(self, user_name: str) -> list[SSHKey]:
        async with self._reading():
            user = self._user_named(user_name)
            return [self._key(r) for r in self._owned(KeyOwner("user_id", user.id, user_name))]

    async def remove_key(self, user_name: str, key_name: str) -> SSHKey:
        async with self._transaction():
            user = self._user_named(user_name)
            return self._remove_owned(KeyOwner("user_id", user.id, user_name), key_name)

    def _remove_owned(self, owner: KeyOwner, key_name: str) -> SSHKey:
        for row in self._owned(owner):
            if row["name"] == key_name:
                key = self._key(row)
                self._drop_keys([key.id])
                return key
        raise owner.missing(key_name)

    async def find_key(self, fingerprint: str) -> SSHKey | None:
        async with self._reading() as db:
            for row in db.keys.values():
                if row["fingerprint"] == fingerprint:
                    return self._key(row)
            return None

    async def touch_key(self, key_id: int, when: datetime) -> None:
        async with self._transaction():
            row = self._db.keys.get(key_id)
            if row is not None:
                row["last_used_at"] = moment(when)
