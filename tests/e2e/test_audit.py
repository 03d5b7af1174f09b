"""The audit trail: logins, failures, refusals, registry changes and pushes, in the registry
(`git-gateway audit`) and as structured log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket

import asyncssh

from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    TIMEOUT,
    Admin,
    Client,
    LiveProcess,
    ServeProcess,
    banner,
    keygen,
    ssh_connect,
    unique,
    write_config,
)


def events(admin, *args: str) -> list[dict[str, object]]:
    return json.loads(admin.ok("audit", "--json", "--limit", "1000", *args))


def test_audit_trail_of_a_user_and_an_app(owner, app, admin, make_user, server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.audit")
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    stranger = make_user("stranger")
    stranger.ssh(f"git-upload-pack '{app}.git'", input="0000")
    unknown = Client(tmp_path / "unknown", keygen(tmp_path / "unknown_id"), server)
    assert unknown.ssh().returncode == 255
    admin.ok("app", "grant", app, stranger.name, "read")

    mine = events(admin, "--user", owner.name)
    kinds = [e["event"] for e in mine]
    assert {"user_added", "key_added", "auth_ok", "push"} <= set(kinds)
    push = next(e for e in mine if e["event"] == "push")
    assert push["app"] == app and push["actor"] == owner.name
    assert push["fingerprint"].startswith("SHA256:") and push["source"].startswith("127.0.0.1:")
    assert push["detail"]["updates"][0].startswith("refs/heads/main 000000000000..")
    key_added = next(e for e in mine if e["event"] == "key_added")
    assert key_added["actor"] == "operator" and key_added["detail"]["key"] == "laptop"

    on_app = {e["event"] for e in events(admin, "--app", app)}
    assert {"app_created", "push", "access_denied", "member_granted"} <= on_app
    denied = next(
        e for e in events(admin, "--user", stranger.name) if e["event"] == "access_denied"
    )
    assert denied["app"] == app
    server.call(server.gateway.domain.access.flush_failures(everything=True))  # minute-end write
    failed = [e for e in events(admin) if e["event"] == "auth_failed"]
    assert any(e["detail"]["reason"] == "unknown key" for e in failed)

    table = admin.ok("audit", "--app", app)
    assert table.splitlines()[0].split() == [
        "AT",
        "EVENT",
        "ACTOR",
        "APP",
        "SOURCE",
        "FINGERPRINT",
        "DETAIL",
    ]
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.audit"]
    assert any("kind=push" in line and f"actor={owner.name}" in line for line in logged)


def test_regression_cli_cancel_of_a_running_deploy_is_audited(gateway_factory, tmp_path, exchange):
    server = gateway_factory(deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)]})
    config = server.config_path
    pushing = None
    try:
        admin = Admin(config)
        name, app = unique("canceller"), unique("cancelapp")
        key = keygen(tmp_path / "id")
        admin.ok("user", "add", name)
        admin.ok("key", "add", name, "k", f"{key}.pub")
        admin.ok("app", "create", app, "--owner", name)
        client = Client(tmp_path / "home", key, server, name=name)
        fifo = exchange / "gate.fifo"
        os.mkfifo(fifo)
        work = client.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
        pushing = LiveProcess(["git", "push", client.url(app), "main"], env=client.env, cwd=work)
        pushing.wait_for(r"remote: waiting for the test")
        deploy_id = json.loads(admin.ok("deploy", "list", app, "--json"))[0]["id"]
        assert "cancelled" in admin.ok("deploy", "cancel", str(deploy_id))
        assert pushing.finish() == 1
        cancels = [e for e in events(admin, "--app", app) if e["event"] == "deploy_cancelled"]
        assert [(e["actor"], e["detail"]["deploy"]) for e in cancels] == [("operator", deploy_id)]
    finally:
        if pushing is not None and pushing.proc.poll() is None:
            pushing.kill()


async def unknown_key_logins(port: int, count: int) -> int:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    refused = 0
    for _ in range(count):
        try:
            async with ssh_connect(port, stranger, preferred_auth="publickey"):
                pass
        except asyncssh.PermissionDenied:
            refused += 1
    return refused


def test_regression_failed_logins_are_aggregated_per_source_and_minute(tmp_path):
    """200 failed connections from one address make a handful of rows with counts, not 200."""
    gateway = ServeProcess(write_config(tmp_path / "gw"))
    try:
        greeted = 0
        for _ in range(150):  # connect, read the banner, hang up: "disconnected"
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as sock:
                greeted += banner(sock).startswith(b"SSH-2.0-")
        assert greeted == 150
        assert asyncio.run(unknown_key_logins(gateway.port, 50)) == 50
    finally:
        assert gateway.stop() == 0  # shutdown writes the counts still held
    rows = [e for e in events(Admin(gateway.config_path)) if e["event"] == "auth_failed"]
    assert 2 <= len(rows) <= 6  # two kinds, over one to three minutes
    assert {e["source"] for e in rows} == {"127.0.0.1"}
    by_kind: dict[str, int] = {}
    for e in rows:
        by_kind[e["detail"]["kind"]] = by_kind.get(e["detail"]["kind"], 0) + e["detail"]["count"]
    assert by_kind == {"disconnected": 150, "unknown_key": 50}
    unknown = next(e for e in rows if e["detail"]["kind"] == "unknown_key")
    assert unknown["detail"]["reason"] == "unknown key"
    assert unknown["fingerprint"].startswith("SHA256:")  # one key, named
    # The log still has one line per connection for the operator.
    assert gateway.stderr.count("event=auth_failed") == 200
