"""Reload (what SIGHUP does) against an in-process gateway: a changed setting is applied to
the next session, and a file that does not validate changes nothing."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import LiveGateway, StartGateway


async def test_reload_applies_a_changed_limit(start_gateway: StartGateway):
    gw = await start_gateway(limits={"user_ops_per_minute": 100})
    alice = await gw.user("alice")
    assert (await gw.run(alice, "keys")).code == 0
    await gw.reload(limits={"user_ops_per_minute": 1})
    assert gw.gateway.config.limits.user_ops_per_minute == 1
    # The bucket the old limit filled may let one more through; the second is refused.
    replies = [await gw.run(alice, "keys") for _ in range(2)]
    refused = [r for r in replies if r.code != 0]
    assert refused, replies
    expected = f"error: too many git operations for {alice.name} (limit 1 per minute)"
    assert refused[0].stderr.startswith(expected)


async def test_reload_applies_a_new_default_deploy_branch(gw: LiveGateway):
    alice = await gw.user("alice")
    await gw.reload(deploy={"branch": "production"})
    app = await gw.app(alice)
    [row] = [a for a in json.loads(await gw.admin("app", "list", "--json")) if a["name"] == app]
    assert row["deploy_branch"] == "production"


async def test_regression_a_config_that_does_not_validate_changes_nothing(
    gw: LiveGateway, caplog: pytest.LogCaptureFixture
):
    alice = await gw.user("alice")
    before = gw.gateway.config
    text = gw.config_path.read_text()
    gw.config_path.write_text(text + '[limits]\nmax_auth_attempts = "many"\n')
    await gw.reload()
    assert gw.gateway.config is before
    assert "event=reload_failed" in caplog.text and "max_auth_attempts" in caplog.text
    assert (await gw.run(alice, "whoami")).code == 0
