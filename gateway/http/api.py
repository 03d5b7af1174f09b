"""The control-plane API: one route table drives both the router and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..deploys import DeployService
from ..domain.facade import Domain
from ..domain.shapes import (
    account_dict,
    app_dict,
    deploy_dict,
    deploy_record_dict,
    key_dict,
    member_dict,
    user_dict,
)
from ..errors import Forbidden, GatewayError, UsageError
from ..models import ApiToken
from . import jsonbody
from .schemas import (
    APP,
    DEPLOY,
    DEPLOY_LOG,
    DEPLOY_RECORD,
    GRANT,
    KEY,
    ME,
    MEMBER,
    NEW_APP,
    NEW_DEPLOY_KEY,
    NEW_KEY,
    NEW_USER,
    NO_CONTENT,
    REMOVED_APP,
    ROLE,
    USER,
    array_of,
)

PREFIX = "/api/v1"


@dataclass
class Call:
    """One authenticated API request."""

    request: web.Request
    token: ApiToken
    domain: Domain
    deploys: DeployService

    @property
    def actor(self) -> str:
        """Who the audit trail names: the user for a personal token, else the token."""
        return self.token.user_name if self.token.user_name else f"token:{self.token.name}"

    def param(self, name: str) -> str:
        return self.request.match_info[name]

    def deploy_id(self) -> int:
        text = self.param("id")
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise UsageError(f"invalid deploy id '{text[:20]}'")
        return int(text)

    async def body(self) -> dict[str, Any]:
        try:
            data = jsonbody.parse(await self.request.read())
        except jsonbody.BadBody as exc:
            raise UsageError(str(exc)) from None
        if not isinstance(data, dict):
            raise UsageError("the request body must be a JSON object")
        return data


def string(body: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise UsageError(f"'{name}' must be a string")
    return value


def boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise UsageError(f"'{name}' must be true or false")
    return value


MAX_LIST = 100


def strings(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"'{name}' must be a list of strings")
    if len(value) > MAX_LIST:
        raise UsageError(f"'{name}' may hold at most {MAX_LIST} items")
    return value


Handler = Callable[[Call], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # relative to PREFIX, aiohttp/OpenAPI style: /users/{user}
    handler: Handler
    summary: str
    response: dict[str, Any]  # JSON schema of the success body
    status: int = 200
    request: dict[str, Any] | None = None  # JSON schema of the body
    personal: bool = False  # acts as the token's user; else operator tokens only
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()


# -- handlers --


async def list_users(call: Call) -> tuple[int, Any]:
    return 200, [user_dict(u) for u in await call.domain.accounts.list_users()]


async def create_user(call: Call) -> tuple[int, Any]:
    body = await call.body()
    user = await call.domain.accounts.create_user(string(body, "name") or "", actor=call.actor)
    return 201, user_dict(await call.domain.accounts.user_summary(user.name))


async def get_user(call: Call) -> tuple[int, Any]:
    return 200, user_dict(await call.domain.accounts.user_summary(call.param("user")))


async def remove_user(call: Call) -> tuple[int, Any]:
    await call.domain.accounts.remove_user(call.param("user"), actor=call.actor)
    return 204, None


async def list_keys(call: Call) -> tuple[int, Any]:
    return 200, [key_dict(k) for k in await call.domain.accounts.list_keys(call.param("user"))]


async def add_key(call: Call) -> tuple[int, Any]:
    return await _add_key(call, call.param("user"))


async def _add_key(call: Call, user: str) -> tuple[int, Any]:
    body = await call.body()
    key = await call.domain.accounts.add_key(
        user,
        string(body, "name") or "",
        string(body, "key") or "",
        actor=call.actor,
        expires=string(body, "expires", required=False),
        read_only=boolean(body, "read_only"),
        apps=strings(body, "apps"),
        # An expiring token adds no key that outlives it.
        not_after=call.token.expires_at,
        bound_by="the token of this request",
        expiry_field='"expires":',
    )
    return 201, key_dict(key)


async def list_deploy_keys(call: Call) -> tuple[int, Any]:
    return 200, [
        key_dict(k) for k in await call.domain.accounts.list_deploy_keys(call.param("app"))
    ]


async def add_deploy_key(call: Call) -> tuple[int, Any]:
    body = await call.body()
    key = await call.domain.accounts.add_deploy_key(
        call.param("app"),
        string(body, "name") or "",
        string(body, "key") or "",
        actor=call.actor,
        write=boolean(body, "write"),
        expires=string(body, "expires", required=False),
        not_after=call.token.expires_at,  # an expiring token adds no key that outlives it
    )
    return 201, key_dict(key)


async def remove_deploy_key(call: Call) -> tuple[int, Any]:
    await call.domain.accounts.remove_deploy_key(
        call.param("app"), call.param("key"), actor=call.actor
    )
    return 204, None


async def remove_key(call: Call) -> tuple[int, Any]:
    await call.domain.accounts.remove_key(call.param("user"), call.param("key"), actor=call.actor)
    return 204, None


def _me(call: Call) -> str:
    # Personal routes only see personal tokens (check_scope), which always name a user.
    return call.token.user_name or ""


async def my_account(call: Call) -> tuple[int, Any]:
    user = await call.domain.accounts.get_user(_me(call))
    keys = await call.domain.accounts.list_keys(user.name)
    return 200, account_dict(user, len(keys))


async def my_keys(call: Call) -> tuple[int, Any]:
    return 200, [key_dict(k) for k in await call.domain.accounts.list_keys(_me(call))]


async def add_my_key(call: Call) -> tuple[int, Any]:
    return await _add_key(call, _me(call))


async def remove_my_key(call: Call) -> tuple[int, Any]:
    await call.domain.accounts.remove_key(_me(call), call.param("key"), actor=call.actor)
    return 204, None


async def list_apps(call: Call) -> tuple[int, Any]:
    return 200, [app_dict(a, call.domain.config) for a in await call.domain.apps.list_apps()]


async def create_app(call: Call) -> tuple[int, Any]:
    body = await call.body()
    app = await call.domain.apps.create_app(
        string(body, "name") or "",
        string(body, "owner") or "",
        string(body, "branch", required=False),
        actor=call.actor,
    )
    return 201, app_dict(app, call.domain.config)


async def get_app(call: Call) -> tuple[int, Any]:
    return 200, app_dict(await call.domain.apps.get_app(call.param("app")), call.domain.config)


async def remove_app(call: Call) -> tuple[int, Any]:
    app = await call.domain.apps.get_app(call.param("app"))
    # Its deploys stop first, so none writes on after its logs are archived.
    await call.deploys.cancel_app(app.name, f"{call.actor} (app removed)")
    removed = await call.domain.apps.remove_app(app.name, actor=call.actor)
    return 200, {
        **app_dict(removed.app, call.domain.config),
        "trashed_to": str(removed.trashed or ""),
    }


async def list_members(call: Call) -> tuple[int, Any]:
    members = await call.domain.apps.members(call.param("app"))
    return 200, [member_dict(m) for m in members]


async def grant(call: Call) -> tuple[int, Any]:
    body = await call.body()
    result = await call.domain.apps.grant(
        call.param("app"), call.param("user"), string(body, "role") or "", actor=call.actor
    )
    return 200, {
        "user": call.param("user"),
        "role": result.role.label,
        "previous": result.previous.label if result.previous else None,
    }


async def revoke(call: Call) -> tuple[int, Any]:
    await call.domain.apps.revoke(call.param("app"), call.param("user"), actor=call.actor)
    return 204, None


async def list_deploys(call: Call) -> tuple[int, Any]:
    text = call.request.query.get("limit", "20")
    if not (text.isascii() and text.isdigit()):
        raise UsageError("limit must be a whole number")
    deploys = await call.domain.records.list_deploys(call.param("app"), limit=int(text))
    return 200, [deploy_dict(d) for d in deploys]


async def get_deploy(call: Call) -> tuple[int, Any]:
    record = await call.domain.records.deploy_record(call.deploy_id())
    return 200, deploy_record_dict(record.deploy, record.deliveries)


async def deploy_log(call: Call) -> tuple[int, Any]:
    deploy = await call.domain.records.get_deploy(call.deploy_id())
    return 200, {
        "id": deploy.id,
        "status": deploy.status.value,
        "log": await call.deploys.log_text(deploy.id),
    }


async def cancel_deploy(call: Call) -> tuple[int, Any]:
    deploy_id = call.deploy_id()
    await call.domain.records.get_deploy(deploy_id)  # 404 before 409
    final = await call.deploys.cancel(deploy_id, call.actor)
    return 200, deploy_dict(final)


ROUTES: list[Route] = [
    Route("GET", "/users", list_users, "List users", array_of(USER)),
    Route("POST", "/users", create_user, "Create a user", USER, 201, NEW_USER, errors=(409, 422)),
    Route("GET", "/users/{user}", get_user, "Get a user", USER, errors=(404,)),
    Route(
        "DELETE",
        "/users/{user}",
        remove_user,
        "Remove a user with their keys and memberships",
        NO_CONTENT,
        204,
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/users/{user}/keys",
        list_keys,
        "List a user's SSH keys",
        array_of(KEY),
        errors=(404,),
    ),
    Route(
        "POST",
        "/users/{user}/keys",
        add_key,
        "Add an SSH public key to a user",
        KEY,
        201,
        NEW_KEY,
        errors=(404, 409, 422),
    ),
    Route(
        "DELETE",
        "/users/{user}/keys/{key}",
        remove_key,
        "Remove one of a user's SSH keys",
        NO_CONTENT,
        204,
        errors=(404,),
    ),
    Route("GET", "/user", my_account, "The token's own account", ME, personal=True),
    Route("GET", "/user/keys", my_keys, "List your SSH keys", array_of(KEY), personal=True),
    Route(
        "POST",
        "/user/keys",
        add_my_key,
        "Add an SSH public key to your account",
        KEY,
        201,
        NEW_KEY,
        personal=True,
        errors=(409, 422),
    ),
    Route(
        "DELETE",
        "/user/keys/{key}",
        remove_my_key,
        "Remove one of your SSH keys",
        NO_CONTENT,
        204,
        personal=True,
        errors=(404,),
    ),
    Route("GET", "/apps", list_apps, "List apps", array_of(APP)),
    Route(
        "POST",
        "/apps",
        create_app,
        "Create an app and its bare repository",
        APP,
        201,
        NEW_APP,
        errors=(404, 409, 422),
    ),
    Route("GET", "/apps/{app}", get_app, "Get an app", APP, errors=(404,)),
    Route(
        "DELETE",
        "/apps/{app}",
        remove_app,
        "Remove an app; its repository is moved to the trash",
        REMOVED_APP,
        errors=(404,),
    ),
    Route("GET", "/apps/{app}/members", list_members, "List an app's members", array_of(MEMBER)),
    Route(
        "GET",
        "/apps/{app}/keys",
        list_deploy_keys,
        "List an app's deploy keys",
        array_of(KEY),
        errors=(404,),
    ),
    Route(
        "POST",
        "/apps/{app}/keys",
        add_deploy_key,
        "Add a deploy key to an app: it reaches this app only (read-only unless write)",
        KEY,
        201,
        NEW_DEPLOY_KEY,
        errors=(404, 409, 422),
    ),
    Route(
        "DELETE",
        "/apps/{app}/keys/{key}",
        remove_deploy_key,
        "Remove one of an app's deploy keys",
        NO_CONTENT,
        204,
        errors=(404,),
    ),
    Route(
        "PUT",
        "/apps/{app}/members/{user}",
        grant,
        "Give a user a role on an app (again to change it)",
        GRANT,
        request=ROLE,
        errors=(404, 409, 422),
    ),
    Route(
        "DELETE",
        "/apps/{app}/members/{user}",
        revoke,
        "Remove a user's access to an app",
        NO_CONTENT,
        204,
        errors=(404,),
    ),
    Route(
        "GET",
        "/apps/{app}/deploys",
        list_deploys,
        "An app's recent deploys, newest first",
        array_of(DEPLOY),
        query={"limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20}},
        errors=(404, 422),
    ),
    Route(
        "GET",
        "/deploys/{id}",
        get_deploy,
        "One deploy with its webhook deliveries",
        DEPLOY_RECORD,
        errors=(404,),
    ),
    Route("GET", "/deploys/{id}/log", deploy_log, "A deploy's log", DEPLOY_LOG, errors=(404,)),
    Route(
        "POST",
        "/deploys/{id}/cancel",
        cancel_deploy,
        "Cancel a queued or running deploy",
        DEPLOY,
        errors=(404, 409),
    ),
]


STATUS_OF: dict[str, int] = {
    "bad_request": 422,
    "invalid_name": 422,
    "invalid_key": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "key_in_use": 409,
    "unavailable": 503,
}


def error_response(exc: GatewayError) -> web.Response:
    status = STATUS_OF.get(exc.code, 400)
    return web.json_response({"error": {"code": exc.code, "message": str(exc)}}, status=status)


def check_scope(route: Route, token: ApiToken) -> None:
    if route.personal and not token.personal:
        raise Forbidden("this endpoint acts as a user: use a personal token (token create --user)")
    if not route.personal and token.personal:
        raise Forbidden("a personal token only reaches /api/v1/user endpoints")
