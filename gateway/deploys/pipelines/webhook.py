"""The webhook pipeline: POST a signed JSON payload, retry with backoff, record every attempt.

A 2xx answer means "accepted". With 202 and an HTTP endpoint configured, the receiver owns
the outcome: it reports it (and optionally log lines) to `status_url` with the bearer
`status_token` from the payload, and the deploy stays running until then (or its timeout).
Any other 2xx ends the deploy as succeeded.

Receivers are the tenants' own servers, so each attempt is bounded whatever they do: one
total deadline (connect, send, answer), no redirects followed (a 3xx is a refusal), the
answer's body never read (at most one socket buffer of it is received before the
connection is closed), no cookies kept and no proxy taken from the environment. Attempts
run on the event loop (aiohttp), not in threads, so slow receivers hold no thread that
probes or pushes need.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import weakref
from typing import Any

import aiohttp

from ... import __version__, executors
from ...config import DeploySettings
from ...models import DeployStatus, WebhookDelivery
from ...times import now
from ..outcome import Outcome
from ..queue import Job
from .base import Context

SIGNATURE_HEADER = "X-Gateway-Signature-256"
MAX_COMMITS = 20
MAX_BACKOFF = 60.0
# How much of an answer the client buffers from the socket; the body itself is never read.
READ_BUFFER = 64 * 1024
# A backstop: concurrent deliveries are bounded by [deploy] max_parallel already.
MAX_CONNECTIONS = 100

# One client session per event loop (one per gateway), created on first use.
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def payload(context: Context, job: Job, status_token: str | None) -> dict[str, Any]:
    deploy = job.deploy
    data: dict[str, Any] = {
        "event": "deploy",
        "deploy_id": deploy.id,
        "app": deploy.app_name,
        "ref": deploy.ref,
        "before": deploy.old_sha,
        "after": deploy.new_sha,
        "pusher": {"name": deploy.pusher, "key_fingerprint": deploy.key_fingerprint},
        "clone_url": context.config.clone_url(deploy.app_name),
        "commits": context.repos.commits_between(
            deploy.app_name, deploy.old_sha, deploy.new_sha, MAX_COMMITS, job.quarantine
        ),
        "mode": deploy.mode,
        "note": deploy.note,
    }
    base = context.status_base_url
    if status_token and base:
        data["status_url"] = f"{base}/deploys/{deploy.id}/status"
        data["status_token"] = status_token
    return data


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = aiohttp.ClientSession(
            # A fresh connection per attempt: nothing of one receiver's connection is reused
            # for another delivery.
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            read_bufsize=READ_BUFFER,
            skip_auto_headers=("Accept-Encoding",),
        )
        _sessions[loop] = session
    return session


async def close() -> None:
    """Close this gateway's client session (call once at shutdown, after the deploys)."""
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


async def _post(url: str, body: bytes, headers: dict[str, str], deadline: float) -> int:
    """One HTTP attempt within `deadline` seconds in all; the status code, or an exception
    (aiohttp.ClientError, TimeoutError) for transport errors."""
    async with _session().post(
        url,
        data=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=deadline),
        allow_redirects=False,
    ) as response:
        # Leaving the block without reading the body closes the connection.
        return response.status


def _error_text(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    return (str(exc) or type(exc).__name__)[:300]


DELIVERY_RESULTS = ("2xx", "3xx", "4xx", "5xx", "error")


def delivery_result(code: int | None) -> str:
    """The bounded metric label of one attempt: its status class, or error (no answer)."""
    if code is None or not 200 <= code < 600:
        return "error"
    return f"{code // 100}xx"


class WebhookPipeline:
    """[deploy] webhook_url: the deploy is a signed POST to the tenant's receiver."""

    kind = "webhook"

    def configured(self, settings: DeploySettings) -> bool:
        return bool(settings.webhook_url)

    async def run(self, job: Job, context: Context) -> Outcome:
        return await deliver(context, job)

    async def close(self) -> None:
        await close()


PIPELINE = WebhookPipeline()


async def deliver(context: Context, job: Job) -> Outcome:
    settings = job.settings
    deploy = job.deploy
    token = secrets.token_urlsafe(32) if context.status_base_url else None
    if token:
        await context.records.set_status_token(deploy.id, token_hash(token))
    body = json.dumps(await executors.run(payload, context, job, token), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"git-gateway/{__version__}",
        "X-Gateway-Event": "deploy",
        "X-Gateway-Deploy": str(deploy.id),
        "X-Gateway-Delivery": secrets.token_hex(8),
    }
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = sign(settings.webhook_secret, body)
    delay = context.config.deploy.webhook_backoff
    last = ""
    for attempt in range(1, settings.webhook_attempts + 1):
        started = time.monotonic()
        code: int | None = None
        error = ""
        try:
            code = await _post(settings.webhook_url, body, headers, settings.webhook_timeout)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            # refused, reset, DNS, TLS, deadline, malformed answer
            error = _error_text(exc, settings.webhook_timeout)
        elapsed_ms = int((time.monotonic() - started) * 1000)
        await context.records.add_webhook_delivery(
            WebhookDelivery(
                deploy.id, attempt, settings.webhook_url, code, error, elapsed_ms, now()
            )
        )
        if context.metrics is not None:
            context.metrics.webhook_deliveries.labels(delivery_result(code)).inc()
        result = f"HTTP {code}" if code is not None else error
        context.log.write(f"webhook attempt {attempt}/{settings.webhook_attempts}: {result}\n")
        if code is not None and 200 <= code < 300:
            if code == 202 and token:
                context.log.write("webhook accepted: waiting for the receiver's status report\n")
                return await context.wait_for_report()
            return Outcome(DeployStatus.SUCCEEDED, None, f"webhook accepted (HTTP {code})")
        if code is not None and 300 <= code < 400:
            # Following would let a receiver point the gateway anywhere: configure the final URL.
            return Outcome(
                DeployStatus.FAILED,
                None,
                f"webhook refused (HTTP {code}: redirects are not followed)",
            )
        if code is not None and code < 500:
            return Outcome(DeployStatus.FAILED, None, f"webhook refused (HTTP {code})")
        last = result
        if attempt < settings.webhook_attempts:
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
    return Outcome(
        DeployStatus.FAILED,
        None,
        f"webhook delivery failed after {settings.webhook_attempts} attempts ({last})",
    )
