"""Second hostile review of issue 20's gateway-side changes: its proofs of concept."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests import helpers
from tests.helpers import Admin, ServerThread, http_base, keygen, unique


def test_regression_an_expiring_token_adds_no_deploy_key_that_outlives_it(
    server: ServerThread, admin: Admin
) -> None:
    """Review 2: the token expiry cap covered users' keys only: an operator token made with
    `--expires 1h` (a CI job's, say) added a write deploy key that never expires, a way to
    keep access after the token is gone."""
    owner, app = unique("dko"), unique("dka")
    admin.ok("user", "add", owner)
    admin.ok("app", "create", app, "--owner", owner)
    made = json.loads(admin.ok("token", "create", unique("ot"), "--expires", "1h", "--json"))
    token, until = made["token"], made["expires_at"]
    directory = Path(server.config.storage.repos).parent
    key = Path(f"{keygen(directory / unique('k'))}.pub").read_text()
    api = f"{http_base(server)}/api/v1/apps/{app}/keys"

    forever = helpers.http("POST", api, token, {"name": "ci", "key": key, "write": True})
    assert forever.status == 422, forever.json()
    assert forever.json()["error"]["message"] == (
        f"the token of this request expires on {until}: a key it adds must expire no later "
        f'("expires": {until})'
    )
    soon = (datetime.now(UTC) + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    within = helpers.http("POST", api, token, {"name": "ci", "key": key, "expires": soon})
    assert within.status == 201 and within.json()["expires_at"] is not None
