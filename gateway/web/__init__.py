"""The HTTP listener (aiohttp): API, keys page, metrics, health probes, deploy status reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ..config import Config
from ..deploys import DeployService
from ..errors import GatewayError, Unauthorized
from ..logs import q
from ..metrics import CONTENT_TYPE, Metrics
from ..models import ApiToken
from ..service import Registry
from ..store import utcnow
from . import api, openapi, reports
from .page import KeysPage

log = logging.getLogger("gateway.http")

MAX_BODY = 1024 * 1024
# A token's "last used" is a write: once a minute is enough.
TOUCH_INTERVAL = 60.0


class WebServer:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        deploys: DeployService,
        metrics: Metrics,
        accepting: Callable[[], bool],
    ) -> None:
        self.config = config
        self.registry = registry
        self.deploys = deploys
        self.metrics = metrics
        self.accepting = accepting
        self._runner: web.AppRunner | None = None
        self._touched: dict[int, float] = {}
        self.app = self._build()

    def _build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._observe])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/openapi.json", self.openapi_document)
        app.router.add_post("/deploys/{id}/status", reports.handler(self.deploys))
        for route in api.ROUTES:
            app.router.add_route(route.method, api.PREFIX + route.path, self._api(route))
        app.router.add_get("/", self.root)
        app.router.add_routes(KeysPage(self.registry, self.config.http.secure_cookies).routes())
        return app

    async def start(self) -> tuple[str, int]:
        if self.config.http.listen is None:
            raise RuntimeError("[http] listen is off")
        host, port = self.config.http.listen
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockname = self._runner.addresses[0]
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middleware: metrics and one log line per request --

    @web.middleware
    async def _observe(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.monotonic()
        route = request.match_info.route.resource
        label = route.canonical if route is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.metrics.http_requests.labels(label, str(status)).inc()
            if label not in ("/metrics", "/healthz", "/readyz"):
                log.info(
                    "event=http method=%s path=%s route=%s status=%d duration=%.3f peer=%s",
                    request.method,
                    q(request.path[:200]),
                    q(label),
                    status,
                    time.monotonic() - started,
                    q(request.remote),
                )

    # -- operations endpoints --

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/keys")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready to serve: SSH accepting, registry readable, repository root writable."""
        checks: dict[str, str] = {}
        checks["ssh"] = "ok" if self.accepting() else "not accepting connections"
        try:
            await asyncio.wait_for(self.registry.store.ping(), 5)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {exc}"[:200]
        checks["repos"] = await asyncio.to_thread(_writable, self.registry.repos.root)
        ready = all(v == "ok" for v in checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status=200 if ready else 503,
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def openapi_document(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    # -- API --

    def _api(self, route: api.Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                token = await self._authenticate(request)
                api.check_scope(route, token)
                call = api.Call(request, token, self.registry, self.deploys)
                status, body = await route.handler(call)
            except GatewayError as exc:
                log.info(
                    "event=api_refused route=%s code=%s reason=%s",
                    q(route.path),
                    exc.code,
                    q(str(exc)),
                )
                return api.error_response(exc)
            if status == 204:
                return web.Response(status=204)
            return web.json_response(body, status=status)

        handle.__name__ = route.handler.__name__
        return handle

    async def _authenticate(self, request: web.Request) -> ApiToken:
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        token = None
        if scheme.lower() == "bearer" and secret.strip():
            token = await self.registry.authenticate(secret.strip())
        if token is None:
            raise Unauthorized("missing or unknown bearer token")
        now = time.monotonic()
        if now - self._touched.get(token.id, -TOUCH_INTERVAL) >= TOUCH_INTERVAL:
            self._touched[token.id] = now
            with contextlib.suppress(Exception):
                await self.registry.store.touch_token(token.id, utcnow())
        return token


def _writable(root: Path) -> str:
    try:
        fd, name = tempfile.mkstemp(prefix=".ready-", dir=root)
        os.close(fd)
        os.unlink(name)
        return "ok"
    except OSError as exc:
        return f"not writable: {exc.strerror or exc}"
