"""The JSON Schema of every API object and request body (the OpenAPI document's components).

They describe what gateway.domain.shapes produces; tests/e2e/test_api.py validates real
responses against them.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_INT = {"type": "integer"}
_INT_OR_NULL = {"type": ["integer", "null"]}


def _object(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }


USER = _object({"id": _INT, "name": _STR, "created_at": _STR, "keys": _INT, "apps": _INT})
ME = _object({"id": _INT, "name": _STR, "created_at": _STR, "keys": _INT})
KEY = _object(
    {
        "id": _INT,
        "user_name": _STR_OR_NULL,
        "name": _STR,
        "algorithm": _STR,
        "bits": _INT,
        "public_key": _STR,
        "comment": _STR,
        "fingerprint": {"type": "string", "pattern": "^SHA256:"},
        "fingerprint_md5": {"type": "string", "pattern": "^MD5:"},
        "created_at": _STR,
        "last_used_at": _STR_OR_NULL,
        "expires_at": _STR_OR_NULL,
        "app_id": _INT_OR_NULL,
        "app_name": _STR_OR_NULL,
        "access": {"enum": ["read", "write", None]},
        "scope": {"type": ["array", "null"], "items": _STR},
    }
)
APP = _object(
    {
        "id": _INT,
        "name": _STR,
        "owner_name": _STR,
        "deploy_branch": _STR,
        "created_at": _STR,
        "clone_url": _STR,
    }
)
REMOVED_APP = {**APP, "properties": {**APP["properties"], "trashed_to": _STR}}
MEMBER = _object(
    {"user": _STR, "role": {"enum": ["read", "write", "admin", "owner"]}, "since": _STR}
)
GRANT = _object(
    {
        "user": _STR,
        "role": {"enum": ["read", "write", "admin"]},
        "previous": {"enum": ["read", "write", "admin", None]},
    }
)
STATUSES = ["queued", "running", "succeeded", "failed", "timed_out", "cancelled", "interrupted"]
DEPLOY = _object(
    {
        "id": _INT,
        "app_id": _INT,
        "app_name": _STR,
        "ref": _STR,
        "old_sha": _STR,
        "new_sha": _STR,
        "pusher": _STR,
        "key_fingerprint": _STR,
        "subject": _STR,
        "author": _STR,
        "mode": _STR,
        "pipeline": _STR,
        "status": {"enum": STATUSES},
        "superseded_by": _INT_OR_NULL,
        "exit_code": _INT_OR_NULL,
        "reason": _STR,
        "created_at": _STR,
        "started_at": _STR_OR_NULL,
        "finished_at": _STR_OR_NULL,
        "note": _STR_OR_NULL,
    }
)
DELIVERY = _object(
    {
        "deploy_id": _INT,
        "attempt": _INT,
        "url": _STR,
        "status_code": _INT_OR_NULL,
        "error": _STR,
        "duration_ms": _INT,
        "created_at": _STR,
    }
)
DEPLOY_RECORD = {
    **DEPLOY,
    "properties": {
        **DEPLOY["properties"],
        "webhook_deliveries": {"type": "array", "items": DELIVERY},
    },
}
DEPLOY_LOG = _object({"id": _INT, "status": {"enum": STATUSES}, "log": _STR})
ERROR = _object(
    {"error": _object({"code": _STR, "message": _STR})},
)
NEW_USER = _object({"name": _STR})
_EXPIRES = {
    "type": "string",
    "description": "when it stops working: 90d, 12h, 4w, 2027-01-31 or an ISO 8601 time",
}
NEW_KEY = _object(
    {
        "name": _STR,
        "key": {"type": "string", "description": "one OpenSSH public key line"},
        "expires": _EXPIRES,
        "read_only": {"type": "boolean", "description": "it may clone and fetch, never push"},
        "apps": {
            "type": "array",
            "items": _STR,
            "description": "it reaches only these apps (within the user's roles)",
        },
    },
    required=["name", "key"],
)
NEW_DEPLOY_KEY = _object(
    {
        "name": _STR,
        "key": {"type": "string", "description": "one OpenSSH public key line"},
        "write": {"type": "boolean", "description": "it may push too (default: read only)"},
        "expires": _EXPIRES,
    },
    required=["name", "key"],
)
NEW_APP = _object({"name": _STR, "owner": _STR, "branch": _STR}, required=["name", "owner"])
ROLE = _object({"role": {"enum": ["read", "write", "admin"]}})
NO_CONTENT: dict[str, Any] = {}


def array_of(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}
