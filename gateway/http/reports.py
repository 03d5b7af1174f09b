"""`POST /deploys/ID/status`: a webhook receiver reports its deploy's log and outcome."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..deploys import DeployService
from ..deploys.pipelines.webhook import token_hash
from ..logs import q
from ..models import DeployStatus
from . import jsonbody

log = logging.getLogger("gateway.http")
EXIT_CODE_MIN, EXIT_CODE_MAX = -(2**31), 2**31 - 1


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def handler(deploys: DeployService) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def report_status(request: web.Request) -> web.Response:
        text = request.match_info["id"]
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            return _error(404, "not found")
        deploy_id = int(text)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        expected = await deploys.store.status_token_hash(deploy_id)
        # Same answer for an unknown deploy and a wrong token; constant-time comparison.
        if not token or expected is None or not hmac.compare_digest(token_hash(token), expected):
            log.warning("event=status_refused deploy=%d reason=bad_token", deploy_id)
            return _error(401, "unknown deploy or bad token")
        try:
            report: Any = jsonbody.parse(await request.read() or b"{}")
        except jsonbody.BadBody as exc:
            return _error(400, str(exc))
        if not isinstance(report, dict):
            return _error(400, "body must be a JSON object")
        log_text = report.get("log")
        status = report.get("status")
        if log_text is not None and not isinstance(log_text, str):
            return _error(400, "log must be a string")
        final = None
        if status is not None:
            if status not in (DeployStatus.SUCCEEDED.value, DeployStatus.FAILED.value):
                return _error(400, "status must be succeeded or failed")
            final = DeployStatus(status)
        exit_code = report.get("exit_code")
        if exit_code is not None and (
            isinstance(exit_code, bool)
            or not isinstance(exit_code, int)
            or not EXIT_CODE_MIN <= exit_code <= EXIT_CODE_MAX
        ):
            # The registry keeps 32-bit integers: a larger one was a database error (500).
            return _error(400, "exit_code must be an integer from -2147483648 to 2147483647")
        answer = await deploys.report(deploy_id, log_text, final, exit_code)
        if answer == "slow down":
            response = _error(429, "too many reports: slow down")
            response.headers["Retry-After"] = "1"
            return response
        if answer != "ok":
            return _error(409, "this deploy is not waiting for a report")
        log.info("event=status_reported deploy=%d status=%s", deploy_id, q(status))
        return web.json_response({"ok": True})

    return report_status
