"""One JSON shape per object: the CLI's `--json` and the HTTP API answer the same thing."""

from __future__ import annotations

import json

from tests.helpers import http, http_base, keygen, unique


def cli_json(admin, *args: str):
    return json.loads(admin.ok(*args, "--json"))


def test_regression_cli_json_equals_the_api(server, admin, tmp_path):
    user, other, app = unique("shape"), unique("shape"), unique("shapeapp")
    for name in (user, other):
        admin.ok("user", "add", name)
    admin.ok("key", "add", user, "laptop", f"{keygen(tmp_path / 'k1')}.pub")
    admin.ok("key", "add", user, "desk", f"{keygen(tmp_path / 'k2', 'ecdsa', 256)}.pub")
    admin.ok("app", "create", app, "--owner", user)
    admin.ok("app", "grant", app, other, "write")
    token = json.loads(admin.ok("token", "create", unique("shapeops"), "--json"))["token"]
    base = http_base(server) + "/api/v1"

    def api(path: str):
        reply = http("GET", base + path, token)
        assert reply.status == 200, reply.body
        return reply.json()

    assert cli_json(admin, "user", "list") == api("/users")
    assert cli_json(admin, "key", "list", user) == api(f"/users/{user}/keys")
    assert cli_json(admin, "app", "list") == api("/apps")
    assert cli_json(admin, "app", "members", app) == api(f"/apps/{app}/members")
    assert cli_json(admin, "deploy", "list", app) == api(f"/apps/{app}/deploys")

    # Internal foreign keys are in neither.
    keys = cli_json(admin, "key", "list", user)
    assert keys and all("user_id" not in k and k["user_name"] == user for k in keys)
    apps = cli_json(admin, "app", "list")
    assert all("owner_id" not in a and "clone_url" in a for a in apps)
    # Tokens have no API listing; their one shape has the same rule (a name, not an id).
    tokens = cli_json(admin, "token", "list")
    assert tokens and all(
        "user_id" not in t and {"name", "user_name", "personal"} <= set(t) for t in tokens
    )
