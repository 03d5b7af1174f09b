"""The one JSON shape of each object, shared by the CLI's `--json` output and the HTTP API.

Internal foreign keys (a key's user id, an app's owner id, a token's user id) are left out:
objects name each other by name, the way both front ends address them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Any

from .. import times
from ..config import Config
from ..models import ApiToken, App, AuditEvent, Deploy, Member, SSHKey, User, WebhookDelivery
from ..store import UserSummary


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Times in their one text form ("2026-01-01T00:00:00Z")."""
    return {k: times.text(v) if isinstance(v, datetime) else v for k, v in data.items()}


def user_dict(summary: UserSummary) -> dict[str, Any]:
    return {**_plain(asdict(summary.user)), "keys": summary.keys, "apps": summary.apps}


def account_dict(user: User, keys: int) -> dict[str, Any]:
    """A user's own account, as the API's GET /user shows it."""
    return {**_plain(asdict(user)), "keys": keys}


def key_dict(key: SSHKey) -> dict[str, Any]:
    data = _plain(asdict(key))
    data.pop("user_id")
    return data


def app_dict(app: App, config: Config) -> dict[str, Any]:
    data = _plain(asdict(app))
    data.pop("owner_id")
    data["clone_url"] = config.clone_url(app.name)
    return data


def member_dict(member: Member) -> dict[str, Any]:
    return {
        "user": member.user_name,
        "role": member.role.label,
        "since": times.text(member.created_at),
    }


def token_dict(token: ApiToken) -> dict[str, Any]:
    data = _plain(asdict(token))
    data.pop("user_id")
    data["personal"] = token.personal
    return data


def deploy_dict(deploy: Deploy) -> dict[str, Any]:
    data = _plain(asdict(deploy))
    data["status"] = deploy.status.value
    return data


def delivery_dict(delivery: WebhookDelivery) -> dict[str, Any]:
    return _plain(asdict(delivery))


def deploy_record_dict(deploy: Deploy, deliveries: list[WebhookDelivery]) -> dict[str, Any]:
    return {**deploy_dict(deploy), "webhook_deliveries": [delivery_dict(d) for d in deliveries]}


def audit_dict(event: AuditEvent) -> dict[str, Any]:
    return {**_plain(asdict(event)), "detail": json.loads(event.detail)}
