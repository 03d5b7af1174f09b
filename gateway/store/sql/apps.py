"""Apps and their members, in SQL: owners, roles granted and revoked, who reaches what."""

from __future__ import annotations

from ...errors import Conflict, NotFound
from ...models import App, Member, Role
from .. import rows, utcnow
from .base import APP_COLUMNS, APP_FROM, ForeignKeyViolation, SQLBase, UniqueViolation

CREATE = """INSERT INTO apps (name, owner_id, deploy_branch, created_at)
            VALUES ($1, $2, $3, $4)"""
LIST = f"SELECT {APP_COLUMNS} {APP_FROM} ORDER BY a.name{{bytes}}"
DELETE = "DELETE FROM apps WHERE id = $1"
ROLE = "SELECT role FROM app_members WHERE app_id = $1 AND user_id = $2 {lock}"
GRANT = """INSERT INTO app_members (app_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)
           ON CONFLICT (app_id, user_id) DO UPDATE SET role = excluded.role"""
REVOKE = "DELETE FROM app_members WHERE app_id = $1 AND user_id = $2 RETURNING role"
MEMBERS = """SELECT u.name AS user_name, m.role, m.created_at FROM app_members m
               JOIN users u ON u.id = m.user_id WHERE m.app_id = $1 ORDER BY u.name{bytes}"""
ROLE_ON = """SELECT CASE WHEN a.owner_id = $1 THEN 'owner' ELSE m.role END AS role
               FROM apps a LEFT JOIN app_members m ON m.app_id = a.id AND m.user_id = $1
              WHERE a.id = $2"""
APPS_FOR = f"""SELECT {APP_COLUMNS}, CASE WHEN a.owner_id = $1 THEN 'owner' ELSE m.role END AS role
                 {APP_FROM} LEFT JOIN app_members m ON m.app_id = a.id AND m.user_id = $1
                WHERE a.owner_id = $1 OR m.user_id IS NOT NULL
                ORDER BY a.name{{bytes}}"""


class AppsSQL(SQLBase):
    async def create_app(self, name: str, owner_name: str, deploy_branch: str) -> App:
        try:
            async with self._transaction():
                owner = await self._user_row(owner_name)
                now = self.dialect.time(utcnow())
                await self.execute(CREATE, name, owner.id, deploy_branch, now)
                return await self._app_row(name)
        except UniqueViolation:
            raise Conflict(f"app '{name}' already exists") from None
        except ForeignKeyViolation:  # the owner was removed meanwhile
            raise NotFound(f"no such user '{owner_name}'") from None

    async def get_app(self, name: str) -> App | None:
        return await self._get_app(name)

    async def list_apps(self) -> list[App]:
        return [rows.record(App, r) for r in await self.fetch(LIST)]

    async def remove_app(self, name: str) -> App:
        async with self._transaction():
            app = await self._app_row(name)
            await self.execute(DELETE, app.id)
        return app

    async def grant(self, app_name: str, user_name: str, role: Role) -> Role | None:
        if role is Role.OWNER:
            raise ValueError("owner is not a grantable role")
        async with self._transaction():
            app = await self._app_row(app_name)
            user = await self._user_row(user_name)
            if user.id == app.owner_id:
                raise Conflict(f"'{user_name}' owns app '{app_name}' and already has every right")
            previous = await self.fetchval(ROLE, app.id, user.id)
            now = self.dialect.time(utcnow())
            await self.execute(GRANT, app.id, user.id, role.label, now)
        return None if previous is None else Role.parse(previous)

    async def revoke(self, app_name: str, user_name: str) -> Role:
        async with self._transaction():
            app = await self._app_row(app_name)
            user = await self._user_row(user_name)
            role = await self.fetchval(REVOKE, app.id, user.id)
            if role is None:
                if user.id == app.owner_id:
                    raise Conflict(
                        f"'{user_name}' owns app '{app_name}': ownership is not revocable"
                    )
                raise NotFound(f"'{user_name}' is not a member of app '{app_name}'")
        return Role.parse(role)

    async def list_members(self, app_name: str) -> list[Member]:
        app = await self._app_row(app_name)
        owner = Member(app.owner_name, Role.OWNER, app.created_at)
        return [owner, *(rows.record(Member, r) for r in await self.fetch(MEMBERS, app.id))]

    async def role_on(self, app_id: int, user_id: int) -> Role | None:
        found = await self.fetchval(ROLE_ON, user_id, app_id)
        return None if found is None else rows.role(found)

    async def apps_for(self, user_id: int) -> list[tuple[App, Role]]:
        found = await self.fetch(APPS_FOR, user_id)
        return [(rows.record(App, r), rows.role(r["role"])) for r in found]
