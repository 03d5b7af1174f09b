"""The webhook pipeline against a real aiohttp receiver on 127.0.0.1 (port 0): the signed
payload, retries with backoff, timeouts, refusals, and a receiver's later report."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway import config
from gateway.deploys import pipelines
from gateway.deploys.outcome import Outcome
from gateway.deploys.pipelines import webhook
from gateway.deploys.queue import Job
from gateway.metrics import Metrics
from gateway.models import Deploy, DeployStatus, WebhookDelivery
from gateway.times import now

SECRET = "s3cret"


@dataclass
class Receiver:
    """A tenant's receiver: answers each POST with the next of `answers` (status, delay)."""

    answers: list[tuple[int, float]]
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived.append(asyncio.get_running_loop().time())
        self.requests.append((dict(request.headers), await request.read()))
        status, delay = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if delay:
            await asyncio.sleep(delay)
        headers = {"Location": "http://127.0.0.1:1/elsewhere"} if 300 <= status < 400 else {}
        return web.Response(status=status, text="body never read", headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def start(*answers: tuple[int, float]) -> Receiver:
        found = Receiver(list(answers))
        app = web.Application()
        app.router.add_post("/hook", found.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        found.url = f"http://127.0.0.1:{port}/hook"
        return found

    yield start
    for runner in runners:
        await runner.cleanup()
    await webhook.close()


class Log:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text


class Records:
    def __init__(self) -> None:
        self.tokens: dict[int, str] = {}
        self.deliveries: list[WebhookDelivery] = []

    async def set_status_token(self, deploy_id: int, token_hash: str) -> None:
        self.tokens[deploy_id] = token_hash

    async def add_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        self.deliveries.append(delivery)


class Repos:
    def commits_between(self, *args: Any) -> list[dict[str, str]]:
        return [{"id": "b" * 40, "message": "the change"}]


def deploy() -> Deploy:
    return Deploy(
        id=7, app_name="web", ref="refs/heads/main", old_sha="0" * 40, new_sha="b" * 40,
        pusher="alice", key_fingerprint="SHA256:k", subject="s", author="a", mode="attached",
        pipeline="webhook", status=DeployStatus.RUNNING, created_at=now(), note="n", app_id=1,
        superseded_by=None, exit_code=None, reason="", started_at=now(), finished_at=None,
    )  # fmt: skip


@dataclass
class Run:
    log: Log
    records: Records
    metrics: Metrics
    outcome: Outcome


async def run(
    tmp_path: Path,
    url: str,
    *,
    base: str | None = None,
    report: Outcome | None = None,
    **deploy_settings: Any,
) -> Run:
    cfg = config.from_mapping(
        {
            "storage": {"control_socket": str(tmp_path / "gw.sock")},
            "deploy": {
                "webhook_url": url,
                "webhook_secret": SECRET,
                "webhook_backoff": 0.05,
                "build_dir": str(tmp_path / "builds"),
                **deploy_settings,
            },
        }
    )
    settings = cfg.deploy_for("web")
    assert pipelines.chosen(settings) is pipelines.KINDS["webhook"]
    log, records, metrics = Log(), Records(), Metrics()

    async def wait_for_report() -> Outcome:
        assert report is not None, "the pipeline waited for a report it should not expect"
        return report

    context = pipelines.Context(
        log=log,  # type: ignore[arg-type]
        config=cfg,
        repos=Repos(),  # type: ignore[arg-type]
        git="git",
        records=records,
        metrics=metrics,
        status_base_url=base,
        wait_for_report=wait_for_report,
    )
    job = Job(deploy(), settings, log, asyncio.get_running_loop().create_future())  # type: ignore[arg-type]
    outcome = await asyncio.wait_for(pipelines.KINDS["webhook"].run(job, context), 30)
    return Run(log, records, metrics, outcome)


async def test_a_signed_payload_accepted(tmp_path: Path, receiver: Any) -> None:
    hook = await receiver((200, 0))
    result = await run(tmp_path, hook.url)
    assert result.outcome == Outcome(DeployStatus.SUCCEEDED, None, "webhook accepted (HTTP 200)")
    [(headers, body)] = hook.requests
    assert headers[webhook.SIGNATURE_HEADER] == webhook.sign(SECRET, body)
    assert headers["X-Gateway-Event"] == "deploy" and headers["X-Gateway-Deploy"] == "7"
    payload = json.loads(body)
    assert (payload["deploy_id"], payload["app"], payload["after"], payload["note"]) == (
        7,
        "web",
        "b" * 40,
        "n",
    )
    assert payload["commits"] == [{"id": "b" * 40, "message": "the change"}]
    assert "status_url" not in payload and not result.records.tokens  # no HTTP endpoint
    assert [(d.attempt, d.status_code) for d in result.records.deliveries] == [(1, 200)]
    assert "webhook attempt 1/4: HTTP 200" in result.log.text


async def test_server_errors_are_retried_with_backoff(tmp_path: Path, receiver: Any) -> None:
    hook = await receiver((500, 0), (503, 0), (200, 0))
    result = await run(tmp_path, hook.url)
    assert result.outcome.status is DeployStatus.SUCCEEDED
    assert [d.status_code for d in result.records.deliveries] == [500, 503, 200]
    # The backoff starts at [deploy] webhook_backoff and doubles.
    gaps = [b - a for a, b in zip(hook.arrived, hook.arrived[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1
    # Every attempt carries the same body, signed alike.
    assert len({body for _, body in hook.requests}) == 1


async def test_every_attempt_failing_fails_the_deploy(tmp_path: Path, receiver: Any) -> None:
    hook = await receiver((502, 0))
    result = await run(tmp_path, hook.url, webhook_attempts=3)
    assert result.outcome == Outcome(
        DeployStatus.FAILED, None, "webhook delivery failed after 3 attempts (HTTP 502)"
    )
    assert len(hook.requests) == 3


async def test_a_slow_receiver_times_out(tmp_path: Path, receiver: Any) -> None:
    hook = await receiver((200, 1.0))
    result = await run(tmp_path, hook.url, webhook_timeout=0.2, webhook_attempts=2)
    assert result.outcome.reason == (
        "webhook delivery failed after 2 attempts (no answer within 0.2s)"
    )
    assert [d.error for d in result.records.deliveries] == ["no answer within 0.2s"] * 2


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (302, "webhook refused (HTTP 302: redirects are not followed)"),
        (404, "webhook refused (HTTP 404)"),
    ],
)
async def test_redirects_and_client_errors_are_refusals_without_retry(
    tmp_path: Path, receiver: Any, status: int, reason: str
) -> None:
    hook = await receiver((status, 0))
    result = await run(tmp_path, hook.url)
    assert result.outcome == Outcome(DeployStatus.FAILED, None, reason)
    assert len(hook.requests) == 1


async def test_accepted_for_later_waits_for_the_receivers_report(
    tmp_path: Path, receiver: Any
) -> None:
    hook = await receiver((202, 0))
    reported = Outcome(DeployStatus.FAILED, 2, "reported failed by the receiver")
    result = await run(tmp_path, hook.url, base="http://127.0.0.1:8080", report=reported)
    assert result.outcome == reported
    payload = json.loads(hook.requests[0][1])
    assert payload["status_url"] == "http://127.0.0.1:8080/deploys/7/status"
    assert result.records.tokens == {7: webhook.token_hash(payload["status_token"])}
    assert "waiting for the receiver's status report" in result.log.text


async def test_a_refused_connection_is_an_error_attempt(tmp_path: Path) -> None:
    result = await run(tmp_path, "http://127.0.0.1:1/hook", webhook_attempts=2)
    assert result.outcome.status is DeployStatus.FAILED
    assert [d.status_code for d in result.records.deliveries] == [None, None]
    assert all(d.error for d in result.records.deliveries)
    await webhook.close()
