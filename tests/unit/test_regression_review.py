"""Regressions found by the hostile-tenant review of the restructure (issue 21): each test
pins a behaviour the layer packages, the facade, the SQL rewrite or the deploy seams changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.models import DeployStatus, NewDeploy
from gateway.ssh.commands import COMMANDS, parse
from tests.unit.fake_pipeline import SHA, ZERO, rig


def test_regression_commands_keep_their_rate_and_app_flags():
    """Before the one-table move, `logs` took an app and was not counted against
    [limits] user_ops_per_minute (only `keys` and git's services were): the table's
    positional `True` for "takes an app" became `rated=True`, so following a deploy's log
    spent the user's git operations and the parser's app-name property no longer covered it."""
    assert {name for name, c in COMMANDS.items() if c.rated} == {"keys"}
    assert {name for name, c in COMMANDS.items() if c.takes_app} == {"deploys", "logs"}
    inv = parse("logs /shop.git 7 --follow")
    assert inv.app == "shop"


async def test_regression_a_deploy_of_an_unknown_pipeline_kind_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry no longer lists the kinds (migration 0012 / 0006 dropped the CHECK on
    deploys.pipeline, saying the gateway checks a deploy's kind against pipelines.KINDS),
    but nothing did: a claimed deploy recorded with a kind this gateway does not know (a
    newer node's, a copied registry, a hand edit) ran whatever the app's settings chose now.
    It ends failed instead, with the reason, and no pipeline runs."""
    async with rig(tmp_path, monkeypatch) as r:
        new = NewDeploy(r.app.id, "refs/heads/main", ZERO, SHA, "alice", "SHA256:x", "s", "a",
                        "attached", "podman")  # fmt: skip
        queued = await r.service.runner.queue(new)
        final = await r.done(queued.id)
        assert (final.status, final.reason) == (
            DeployStatus.FAILED,
            "unknown deploy pipeline kind 'podman' on this gateway",
        )
        assert r.fake.runs == []
        # A known kind still runs.
        assert (await r.done((await r.queue()).id)).status is DeployStatus.SUCCEEDED
        assert len(r.fake.runs) == 1


# Digits that are not ASCII: str.isdigit() accepts "²" and "٣" but int() refuses "²", so a
# check with isdigit alone let them through to a ValueError: a 500 and an internal-error log
# line from one request (the deploy report route and the keys page's sign-in need no token).
NOT_ASCII_DIGITS = ["²", "1²", "٣"]


@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
async def test_regression_a_report_for_a_non_ascii_deploy_id_is_a_404(text: str) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.http import reports

    class Store:
        async def status_token_hash(self, deploy_id: int) -> None:
            raise AssertionError("never looked up")

    class Deploys:
        store = Store()

    app = web.Application()
    app.router.add_post("/deploys/{id}/status", reports.handler(Deploys()))  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        answer = await client.post(f"/deploys/{text}/status", json={"status": "succeeded"})
        assert answer.status == 404


@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
def test_regression_a_presignin_cookie_with_non_ascii_digits_is_refused(text: str) -> None:
    from gateway.http.sessions import Sessions

    sessions = Sessions.__new__(Sessions)  # check_presignin reads nothing of the instance
    assert sessions.check_presignin(f"abc.{text}", "field") is False


@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
async def test_regression_api_deploy_ids_and_limits_with_non_ascii_digits_are_422(
    text: str,
) -> None:
    from types import SimpleNamespace

    from gateway.errors import UsageError
    from gateway.http import api

    request = SimpleNamespace(match_info={"id": text, "app": "web"}, query={"limit": text})
    call = api.Call.__new__(api.Call)
    call.request = request  # type: ignore[assignment]
    with pytest.raises(UsageError):
        call.deploy_id()
    with pytest.raises(UsageError):
        await api.list_deploys(call)
