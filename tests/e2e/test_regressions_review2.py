"""Second hostile review of issue 20's gateway-side changes: its proofs of concept."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import (
    TIMEOUT,
    Admin,
    ServerThread,
    http_base,
    keygen,
    ssh_connect,
    unique,
)


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


@pytest.fixture(scope="module")
def one_push(module_gateways):  # type: ignore[no-untyped-def]
    """A gateway where one user may run one push at once."""
    thread = module_gateways(name="pushcap", limits={"max_pushes_per_user": 1})
    keys = {
        name: thread.admin.enroll(name, thread.home, f"{name}-app") for name in ("hog", "other")
    }
    return thread, keys


async def test_regression_a_users_pushes_are_capped_per_node(one_push, caplog) -> None:
    """Review 2: max_fetches_per_user left pushes out, so one user's 64 connections x 10
    sessions ran 640 receive-packs at once (each an index-pack and a quarantine of up to
    max_input_size, 2 GiB, on the repositories' disk)."""
    server, keys = one_push
    caplog.set_level("INFO", logger="gateway.git")
    async with ssh_connect(server.port, keys["hog"]) as conn:
        command = "git-receive-pack 'hog-app.git'"
        held = await conn.create_process(command, encoding=None)
        assert await asyncio.wait_for(held.stdout.read(4), TIMEOUT)  # it is being served
        refused = await asyncio.wait_for(conn.run(command, encoding=None), TIMEOUT)
        assert refused.exit_status == 1
        assert refused.stderr == (
            b"error: too many pushes for hog (at most 1 at once on this node; "
            b"[limits] max_pushes_per_user): retry when one has finished\n"
        )
        assert "reason=max_pushes_per_user limit=1" in caplog.text
        # A fetch of the same user is not counted with pushes, nor is another user's push.
        fetch = await asyncio.wait_for(
            conn.run("git-upload-pack 'hog-app.git'", input=b"0000", encoding=None), TIMEOUT
        )
        assert fetch.exit_status == 0
        async with ssh_connect(server.port, keys["other"]) as other:
            push = await asyncio.wait_for(
                other.run("git-receive-pack 'other-app.git'", input=b"0000", encoding=None),
                TIMEOUT,
            )
            assert push.exit_status == 0
        held.stdin.write(b"0000")
        held.stdin.write_eof()
        await asyncio.wait_for(held.wait(), TIMEOUT)
        again = await asyncio.wait_for(conn.run(command, input=b"0000", encoding=None), TIMEOUT)
        assert again.exit_status == 0  # its slot is free again
    assert {k: v for k, v in server.gateway.admission.held.items() if k[0] == "pushes"} == {}
