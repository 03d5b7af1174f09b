"""The OpenAPI 3.1 document, generated from the same route table the router uses."""

from __future__ import annotations

import re
from typing import Any

from .. import __version__
from .api import PREFIX, ROUTES, Route
from .schemas import ERROR

_PARAM = re.compile(r"{(\w+)}")
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No content",
    401: "Missing or unknown token",
    403: "The token does not allow this request",
    404: "Not found",
    409: "Conflict with what is registered",
    422: "Invalid input",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(route: Route) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "integer"} if name == "id" else {"type": "string"},
        }
        for name in _PARAM.findall(route.path)
    ]
    params += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in route.query.items()
    ]
    success: dict[str, Any] = {"description": _REASONS[route.status]}
    if route.status != 204:
        success["content"] = _json(route.response)
    responses: dict[str, Any] = {str(route.status): success}
    for code in sorted({401, 403, *route.errors}):
        responses[str(code)] = {"description": _REASONS[code], "content": _json(ERROR)}
    op: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "tags": ["personal" if route.personal else "operator"],
        "parameters": params,
        "responses": responses,
    }
    if route.request is not None:
        op["requestBody"] = {"required": True, "content": _json(route.request)}
    return op


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "git-gateway control-plane API",
            "version": __version__,
            "description": (
                "Users, SSH keys, apps, members and deploys of a git-gateway. "
                "Operator tokens reach every endpoint but /user; personal tokens "
                "(`git-gateway token create NAME --user USER`) reach only /user."
            ),
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "tags": [
            {"name": "operator", "description": "operator tokens"},
            {"name": "personal", "description": "personal tokens: act as their user"},
        ],
        "paths": paths,
    }
