"""The memory store's apps and members (owners, roles granted and revoked)."""

from __future__ import annotations

from ...errors import Conflict, NotFound
from ...models import App, Member, Role
from .. import rows, utcnow
from .accounts import AccountsMemory


class AppsMemory(AccountsMemory):
    async def create_app(self, name: str, owner_name: str, deploy_branch: str) -> App:
        async with self._transaction():
            owner = self._user_named(owner_name)
            if self._find_app(name) is not None:
                raise Conflict(f"app '{name}' already exists")
            app_id = self._next_id("apps")
            self._db.apps[app_id] = {
                "id": app_id,
                "name": name,
                "owner_id": owner.id,
                "deploy_branch": deploy_branch,
                "created_at": utcnow(),
            }
            return self._app_named(name)

    async def get_app(self, name: str) -> App | None:
        async with self._reading():
            return self._find_app(name)

    async def list_apps(self) -> list[App]:
        async with self._reading() as db:
            return [self._app(r) for r in sorted(db.apps.values(), key=lambda r: r["name"])]

    async def remove_app(self, name: str) -> App:
        async with self._transaction():
            app = self._app_named(name)
            db = self._db
            del db.apps[app.id]
            # What goes with the app: its deploy keys, its place in scoped keys, its
            # members, its deploys with their logs and webhook deliveries, and its home.
            self._drop_keys([k for k, row in db.keys.items() if row["app_id"] == app.id])
            db.key_apps = {pair for pair in db.key_apps if pair[1] != app.id}
            db.members = {k: v for k, v in db.members.items() if k[0] != app.id}
            self._drop_deploys([d for d, row in db.deploys.items() if row["app_id"] == app.id])
            self._drop_orphan_homes()
            return app

    def _drop_deploys(self, ids: list[int]) -> None:
        db = self._db
        gone = set(ids)
        for deploy_id in gone:
            del db.deploys[deploy_id]
        db.chunks = {k: v for k, v in db.chunks.items() if k[0] not in gone}
        db.deliveries = {k: v for k, v in db.deliveries.items() if v["deploy_id"] not in gone}

    async def grant(self, app_name: str, user_name: str, role: Role) -> Role | None:
        if role is Role.OWNER:
            raise ValueError("owner is not a grantable role")
        async with self._transaction():
            app = self._app_named(app_name)
            user = self._user_named(user_name)
            if user.id == app.owner_id:
                raise Conflict(f"'{user_name}' owns app '{app_name}' and already has every right")
            previous = self._db.members.get((app.id, user.id))
            if previous is not None:
                self._db.members[(app.id, user.id)] = {**previous, "role": role.label}
                return Role.parse(previous["role"])
            self._db.members[(app.id, user.id)] = {"role": role.label, "created_at": utcnow()}
            return None

    async def revoke(self, app_name: str, user_name: str) -> Role:
        async with self._transaction():
            app = self._app_named(app_name)
            user = self._user_named(user_name)
            member = self._db.members.pop((app.id, user.id), None)
            if member is None:
                if user.id == app.owner_id:
                    raise Conflict(
                        f"'{user_name}' owns app '{app_name}': ownership is not revocable"
                    )
                raise NotFound(f"'{user_name}' is not a member of app '{app_name}'")
            return Role.parse(member["role"])

    async def list_members(self, app_name: str) -> list[Member]:
        async with self._reading() as db:
            app = self._app_named(app_name)
            members = [
                rows.record(Member, row, user_name=db.users[user_id]["name"])
                for (app_id, user_id), row in db.members.items()
                if app_id == app.id
            ]
        owner = Member(app.owner_name, Role.OWNER, app.created_at)
        return [owner, *sorted(members, key=lambda m: m.user_name)]

    def _role(self, app_id: int, user_id: int) -> Role | None:
        app = self._db.apps.get(app_id)
        if app is None:
            return None
        if app["owner_id"] == user_id:
            return Role.OWNER
        member = self._db.members.get((app_id, user_id))
        return None if member is None else Role.parse(member["role"])

    async def role_on(self, app_id: int, user_id: int) -> Role | None:
        async with self._reading():
            return self._role(app_id, user_id)

    async def apps_for(self, user_id: int) -> list[tuple[App, Role]]:
        async with self._reading() as db:
            found = []
            for row in sorted(db.apps.values(), key=lambda r: r["name"]):
                role = self._role(row["id"], user_id)
                if role is not None:
                    found.append((self._app(row), role))
            return found
