"""A small HTTP endpoint: `GET /healthz`, and `POST /deploys/ID/status` for webhook receivers.

Deliberately minimal (one request per connection, bounded sizes, read timeouts): it exists
so receivers can report a deploy's outcome, not to serve arbitrary traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from typing import Any

from .deploys import DeployService
from .logs import q
from .models import DeployStatus
from .webhook import token_hash

log = logging.getLogger("gateway.http")

MAX_HEADER = 16 * 1024
MAX_BODY = 1024 * 1024
READ_TIMEOUT = 10.0
_STATUS_PATH = re.compile(r"/deploys/(\d{1,18})/status")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
}


class HTTPServer:
    def __init__(self, host: str, port: int, deploys: DeployService) -> None:
        self.host, self.port = host, port
        self.deploys = deploys
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_HEADER
        )
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._respond(reader), READ_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, body = 400, {"error": "bad request"}
        except ConnectionError:
            return
        data = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + data)
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length < 0 or length > MAX_BODY:
            return 413, {"error": "body too large"}
        body = await reader.readexactly(length) if length else b""
        if path == "/healthz":
            return (200, {"status": "ok"}) if method == "GET" else (405, {"error": "GET only"})
        match = _STATUS_PATH.fullmatch(path)
        if not match:
            return 404, {"error": "not found"}
        if method != "POST":
            return 405, {"error": "POST only"}
        return await self._status(int(match.group(1)), headers, body)

    async def _status(
        self, deploy_id: int, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        auth = headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        expected = await self.deploys.store.status_token_hash(deploy_id)
        # Same answer for an unknown deploy and a wrong token; constant-time comparison.
        if not token or expected is None or not hmac.compare_digest(token_hash(token), expected):
            log.warning("event=status_refused deploy=%d reason=bad_token", deploy_id)
            return 401, {"error": "unknown deploy or bad token"}
        try:
            report = json.loads(body or b"{}")
        except ValueError:
            return 400, {"error": "body must be JSON"}
        if not isinstance(report, dict):
            return 400, {"error": "body must be a JSON object"}
        text = report.get("log")
        status = report.get("status")
        if text is not None and not isinstance(text, str):
            return 400, {"error": "log must be a string"}
        final = None
        if status is not None:
            if status not in (DeployStatus.SUCCEEDED.value, DeployStatus.FAILED.value):
                return 400, {"error": "status must be succeeded or failed"}
            final = DeployStatus(status)
        exit_code = report.get("exit_code")
        if exit_code is not None and (
            isinstance(exit_code, bool) or not isinstance(exit_code, int)
        ):
            return 400, {"error": "exit_code must be an integer"}
        accepted = self.deploys.report(deploy_id, text, final, exit_code)
        if not accepted:
            return 409, {"error": "this deploy is not waiting for a report"}
        log.info("event=status_reported deploy=%d status=%s", deploy_id, q(status))
        return 200, {"ok": True}
