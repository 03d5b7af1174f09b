"""The control-plane API against the real handlers: every operation of /openapi.json is
called, and every answer is checked against the schema the document gives for it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers import (
    DEPLOY_PYTHON,
    Admin,
    Client,
    GatewayFactory,
    GatewayHandle,
    ServerThread,
    http,
    http_base,
    keygen,
    keygen_fingerprint,
    unique,
)

PREFIX = "/api/v1"


def operator_token(admin: Admin) -> str:
    return json.loads(admin.ok("token", "create", unique("ops"), "--json"))["token"]


def personal_token(admin: Admin, user: str) -> str:
    return json.loads(admin.ok("token", "create", unique("pat"), "--user", user, "--json"))["token"]


class Spec:
    """The served OpenAPI document, and which of its operations a test has exercised."""

    def __init__(self, base: str) -> None:
        self.base = base
        reply = http("GET", base + "/openapi.json")
        assert reply.status == 200
        self.doc = reply.json()
        self.called: set[tuple[str, str]] = set()

    def operations(self) -> set[tuple[str, str]]:
        return {(m.upper(), p) for p, ops in self.doc["paths"].items() for m in ops}

    def call(
        self, method: str, template: str, token: str, body: object = None, **params: str
    ) -> Any:
        path = template.format(**params)
        reply = http(method, self.base + path, token, body)
        operation = self.doc["paths"][template][method.lower()]
        answer = operation["responses"].get(str(reply.status))
        assert answer is not None, f"{method} {template}: undocumented status {reply.status}"
        if reply.status == 204:
            assert reply.body == b""
        else:
            assert reply.headers["Content-Type"].startswith("application/json")
            jsonschema.validate(reply.json(), answer["content"]["application/json"]["schema"])
        self.called.add((method, template))
        return reply


@pytest.fixture(scope="module")
def server(module_gateways: GatewayFactory) -> GatewayHandle:
    """A gateway whose deploys run a real command, so that pushes make deploy records."""
    command = [DEPLOY_PYTHON, "-c", "print('deployed')"]
    return module_gateways(name="api", deploy={"command": command})


@pytest.fixture
def spec(server: ServerThread) -> Spec:
    return Spec(http_base(server))


def test_openapi_lists_exactly_the_served_routes(server: ServerThread, spec: Spec) -> None:
    served = {
        (route.method, route.resource.canonical)
        for route in server.gateway.web.app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith(PREFIX)
    }
    assert served == spec.operations()
    assert spec.doc["openapi"] == "3.1.0"
    for _, ops in spec.doc["paths"].items():
        for op in ops.values():
            assert op["summary"] and op["operationId"]


def test_every_operation_against_its_schema(
    server: ServerThread, admin: Admin, spec: Spec, tmp_path: Path
) -> None:
    ops = operator_token(admin)
    user, other, app = unique("apiu"), unique("apio"), unique("apiapp")
    key = keygen(tmp_path / "k1")
    pub = (tmp_path / "k1.pub").read_text()

    assert spec.call("POST", f"{PREFIX}/users", ops, {"name": user}).status == 201
    assert spec.call("POST", f"{PREFIX}/users", ops, {"name": other}).status == 201
    assert spec.call("POST", f"{PREFIX}/users", ops, {"name": user}).json()["error"]["code"] == (
        "conflict"
    )
    assert spec.call("GET", f"{PREFIX}/users", ops).status == 200
    assert spec.call("GET", f"{PREFIX}/users/{{user}}", ops, user=user).json()["name"] == user

    added = spec.call(
        "POST", f"{PREFIX}/users/{{user}}/keys", ops, {"name": "laptop", "key": pub}, user=user
    )
    assert added.status == 201
    assert added.json()["fingerprint"] == keygen_fingerprint(Path(f"{key}.pub"))
    listed = spec.call("GET", f"{PREFIX}/users/{{user}}/keys", ops, user=user).json()
    assert [k["name"] for k in listed] == ["laptop"]

    created = spec.call(
        "POST", f"{PREFIX}/apps", ops, {"name": app, "owner": user, "branch": "main"}
    )
    assert created.status == 201
    assert created.json()["clone_url"].endswith(f"{app}.git")
    assert (server.repos / f"{app}.git" / "HEAD").exists()
    assert spec.call("GET", f"{PREFIX}/apps", ops).status == 200
    assert spec.call("GET", f"{PREFIX}/apps/{{app}}", ops, app=app).json()["owner_name"] == user

    granted = spec.call(
        "PUT",
        f"{PREFIX}/apps/{{app}}/members/{{user}}",
        ops,
        {"role": "write"},
        app=app,
        user=other,
    ).json()
    assert granted == {"user": other, "role": "write", "previous": None}
    members = spec.call("GET", f"{PREFIX}/apps/{{app}}/members", ops, app=app).json()
    assert {(m["user"], m["role"]) for m in members} == {(user, "owner"), (other, "write")}

    # A push makes a deploy record to read through the API.
    client = Client(tmp_path / "home", key, server, name=user)
    repo = client.new_repo(tmp_path / "work")
    client.git("push", "-q", client.url(app), "main", cwd=repo, check=True)
    deploys = spec.call("GET", f"{PREFIX}/apps/{{app}}/deploys", ops, app=app).json()
    assert len(deploys) == 1
    deploy_id = str(deploys[0]["id"])
    server.wait_until(lambda: deploy_id and int(deploy_id) not in server.gateway.deploys.jobs)
    record = spec.call("GET", f"{PREFIX}/deploys/{{id}}", ops, id=deploy_id).json()
    assert record["pusher"] == user and record["webhook_deliveries"] == []
    log = spec.call("GET", f"{PREFIX}/deploys/{{id}}/log", ops, id=deploy_id).json()
    assert log["id"] == int(deploy_id) and isinstance(log["log"], str)
    ended = spec.call("POST", f"{PREFIX}/deploys/{{id}}/cancel", ops, id=deploy_id)
    assert ended.status == 409 and "already ended" in ended.json()["error"]["message"]
    missing = spec.call("GET", f"{PREFIX}/deploys/{{id}}", ops, id="999999")
    assert missing.status == 404

    # Deploy keys: a key of this app only.
    ci = keygen(tmp_path / "ci")
    body = {"name": "ci", "key": Path(f"{ci}.pub").read_text(), "write": True, "expires": "30d"}
    added = spec.call("POST", f"{PREFIX}/apps/{{app}}/keys", ops, body, app=app).json()
    assert (added["app_name"], added["access"], added["user_name"]) == (app, "write", None)
    listed = spec.call("GET", f"{PREFIX}/apps/{{app}}/keys", ops, app=app).json()
    assert [k["name"] for k in listed] == ["ci"]
    gone = spec.call("DELETE", f"{PREFIX}/apps/{{app}}/keys/{{key}}", ops, app=app, key="ci")
    assert gone.status == 204

    assert (
        spec.call(
            "DELETE", f"{PREFIX}/apps/{{app}}/members/{{user}}", ops, app=app, user=other
        ).status
        == 204
    )
    removed = spec.call("DELETE", f"{PREFIX}/apps/{{app}}", ops, app=app).json()
    assert ".trash" in removed["trashed_to"]
    assert (
        spec.call(
            "DELETE", f"{PREFIX}/users/{{user}}/keys/{{key}}", ops, user=user, key="laptop"
        ).status
        == 204
    )
    assert spec.call("DELETE", f"{PREFIX}/users/{{user}}", ops, user=user).status == 204
    assert spec.call("GET", f"{PREFIX}/users/{{user}}", ops, user=user).status == 404

    # The personal endpoints, with a token of the other user.
    mine = personal_token(admin, other)
    assert spec.call("GET", f"{PREFIX}/user", mine).json()["name"] == other
    key2 = keygen(tmp_path / "k2")
    body = {"name": "desk", "key": Path(f"{key2}.pub").read_text()}
    assert spec.call("POST", f"{PREFIX}/user/keys", mine, body).status == 201
    assert [k["name"] for k in spec.call("GET", f"{PREFIX}/user/keys", mine).json()] == ["desk"]
    assert spec.call("DELETE", f"{PREFIX}/user/keys/{{key}}", mine, key="desk").status == 204

    assert spec.called == spec.operations(), spec.operations() - spec.called


def test_errors_have_stable_codes_and_the_cli_messages(
    server: ServerThread, admin: Admin, tmp_path: Path
) -> None:
    base = http_base(server) + PREFIX
    ops = operator_token(admin)
    alice, bob = unique("alice"), unique("bob")
    admin.ok("user", "add", alice)
    admin.ok("user", "add", bob)
    key = keygen(tmp_path / "shared")
    admin.ok("key", "add", alice, "laptop", f"{key}.pub")
    pub = Path(f"{key}.pub").read_text()

    reply = http("POST", f"{base}/users/{bob}/keys", ops, {"name": "mine", "key": pub})
    assert reply.status == 409
    assert reply.json() == {
        "error": {
            "code": "key_in_use",
            "message": "this SSH key is already used by another account",
        }
    }
    # The CLI refuses with the very same line.
    code, _, err = admin("key", "add", bob, "mine", f"{key}.pub")
    assert code == 1 and err == "error: this SSH key is already used by another account\n"

    bad = http("POST", f"{base}/users/{bob}/keys", ops, {"name": "x", "key": "ssh-rsa AAAA"})
    assert bad.status == 422 and bad.json()["error"]["code"] == "invalid_key"
    code, _, err = admin("key", "add", bob, "x", "-", stdin="ssh-rsa AAAA")
    assert err == f"error: {bad.json()['error']['message']}\n"

    name = http("POST", f"{base}/users", ops, {"name": "Bad Name"})
    assert name.status == 422 and name.json()["error"]["code"] == "invalid_name"
    shape = http("POST", f"{base}/users", ops, raw=b"[1,2]")
    assert shape.status == 422 and shape.json()["error"]["code"] == "bad_request"
    assert http("POST", f"{base}/users", ops, raw=b"{nope").json()["error"]["code"] == (
        "bad_request"
    )
    role = http("PUT", f"{base}/apps/nope/members/{bob}", ops, {"role": "owner"})
    assert role.status == 422 and "invalid role" in role.json()["error"]["message"]
    # Nothing was changed by the refusals.
    assert json.loads(admin.ok("key", "list", bob, "--json")) == []


def test_tokens_authenticate_scope_and_are_stored_hashed(
    server: ServerThread, admin: Admin
) -> None:
    base = http_base(server) + PREFIX
    user = unique("scoped")
    admin.ok("user", "add", user)
    ops, mine = operator_token(admin), personal_token(admin, user)

    for token in (None, "ggw_not-a-real-token", "", "Basic abc"):
        reply = http("GET", f"{base}/users", token)
        assert reply.status == 401 and reply.json()["error"]["code"] == "unauthorized"
    assert http("GET", f"{base}/users", mine).json()["error"]["code"] == "forbidden"
    assert http("GET", f"{base}/user", ops).json()["error"]["code"] == "forbidden"
    assert http("GET", f"{base}/user", mine).status == 200

    listed = json.loads(admin.ok("token", "list", "--json"))
    assert any(t["user_name"] == user and t["last_used_at"] for t in listed)
    db = sqlite3.connect(server.config.storage.database)
    try:
        stored = [row[0] for row in db.execute("SELECT token_hash FROM api_tokens")]
    finally:
        db.close()
    assert ops not in stored and mine not in stored
    assert all(len(h) == 64 for h in stored)

    name = next(t["name"] for t in listed if t["user_name"] == user)
    admin.ok("token", "remove", name)
    assert http("GET", f"{base}/user", mine).status == 401
    audit = admin.ok("audit", "--user", user, "--json")
    assert "token_created" in audit and "token_removed" in audit


def test_api_changes_are_audited_with_the_token(server: ServerThread, admin: Admin) -> None:
    ops = operator_token(admin)
    user = unique("audited")
    assert http("POST", http_base(server) + f"{PREFIX}/users", ops, {"name": user}).status == 201
    events = json.loads(admin.ok("audit", "--user", user, "--json"))
    added = next(e for e in events if e["event"] == "user_added")
    assert added["actor"].startswith("token:ops")
