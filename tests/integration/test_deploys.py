"""A push that deploys, with a stand-in pipeline: the webhook kind pointed at an aiohttp
server the test runs on 127.0.0.1 (the only pipeline kind that needs no sandbox today)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.helpers import unique
from tests.integration.conftest import LiveGateway, StartGateway
from tests.integration.gitwire import commit_and_pack, push, server_refs


class Receiver:
    """A webhook receiver answering `status` to every delivery and keeping what it got."""

    def __init__(self) -> None:
        self.status = 200
        self.deliveries: list[tuple[dict[str, str], dict[str, object]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.deliveries.append((dict(request.headers), body))
        return web.Response(status=self.status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    stand_in = Receiver()
    app = web.Application()
    app.router.add_post("/hook", stand_in.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    stand_in.url = f"http://{host}:{port}/hook"
    try:
        yield stand_in
    finally:
        await runner.cleanup()


@pytest.fixture
async def deploying(start_gateway: StartGateway, receiver: Receiver) -> LiveGateway:
    return await start_gateway(deploy={"webhook_url": receiver.url, "webhook_attempts": 1})


async def deploys(gw: LiveGateway, app: str) -> list[dict[str, object]]:
    return json.loads(await gw.admin("deploy", "list", app, "--json"))


async def test_a_push_deploys_through_the_pipeline(
    deploying: LiveGateway, receiver: Receiver, tmp_path: Path
):
    gw = deploying
    alice = await gw.user("alice")
    app = await gw.app(alice)
    sha, pack = await asyncio.to_thread(commit_and_pack, tmp_path / "work", {"README": "hi\n"})
    pushed = await push(gw, alice, app, sha, pack)
    assert pushed.report == [b"unpack ok\n", b"ok refs/heads/main\n"]
    assert pushed.code == 0, pushed.stderr
    [(headers, body)] = receiver.deliveries
    assert headers["X-Gateway-Event"] == "deploy"
    assert (body["app"], body["ref"], body["after"]) == (app, "refs/heads/main", sha)
    assert body["pusher"] == {"name": alice.name, "key_fingerprint": alice.fingerprint}
    [deploy] = await deploys(gw, app)
    assert (deploy["status"], deploy["new_sha"]) == ("succeeded", sha)


async def test_a_refused_delivery_fails_the_push_but_keeps_the_ref(
    deploying: LiveGateway, receiver: Receiver, tmp_path: Path
):
    """An attached deploy that fails makes the push exit non-zero; the refs are stored."""
    gw = deploying
    receiver.status = 400
    alice = await gw.user("alice")
    app = await gw.app(alice)
    sha, pack = await asyncio.to_thread(commit_and_pack, tmp_path / "work", {"README": "hi\n"})
    pushed = await push(gw, alice, app, sha, pack)
    assert pushed.report == [b"unpack ok\n", b"ok refs/heads/main\n"]
    assert pushed.code == 1
    assert "webhook refused (HTTP 400)" in pushed.stderr
    assert (await asyncio.to_thread(server_refs, gw.repo(app)))["refs/heads/main"] == sha
    [deploy] = await deploys(gw, app)
    assert deploy["status"] == "failed"


async def test_regression_a_push_to_another_branch_deploys_nothing(
    deploying: LiveGateway, receiver: Receiver, tmp_path: Path
):
    """The app deploys `production`: a push of `main` stores the branch and deploys nothing."""
    gw = deploying
    alice = await gw.user("alice")
    app = unique("app")
    await gw.admin("app", "create", app, "--owner", alice.name, "--branch", "production")
    sha, pack = await asyncio.to_thread(commit_and_pack, tmp_path / "work", {"README": "hi\n"})
    pushed = await push(gw, alice, app, sha, pack)
    assert pushed.code == 0, pushed.stderr
    assert receiver.deliveries == []
    assert await deploys(gw, app) == []
