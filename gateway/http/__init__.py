"""The HTTP listener (aiohttp): API, keys page, metrics, health probes, deploy status reports."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware as AiohttpMiddleware

from ..config import Config, Settings
from ..deploys import DeployService
from ..domain.facade import Domain
from ..errors import GatewayError, StoreUnavailable, Unauthorized, printable
from ..logs import q
from ..metrics import CONTENT_TYPE, Metrics
from ..models import ApiToken
from . import api, openapi, reports
from .listener import HTTPListener
from .page import KeysPage
from .sessions import Sessions

log = logging.getLogger("gateway.http")

# A readiness check that takes longer than this fails.
CHECK_TIMEOUT = 5.0
PROBES = ("/healthz", "/readyz", "/metrics")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class WebServer:
    def __init__(
        self,
        settings: Settings,
        domain: Domain,
        deploys: DeployService,
        metrics: Metrics,
        ssh_status: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.domain = domain
        self.deploys = deploys
        self.metrics = metrics
        self.ssh_status = ssh_status  # "ok", "draining" or why SSH does not accept
        http = self.config.http
        self.main = HTTPListener("main", http, metrics)
        self.monitoring = HTTPListener("monitoring", http, metrics)
        self.monitoring_address: tuple[str, int] | None = None
        # The disk check has a thread of its own: a pool busy with repository work must not
        # make the node look down, and a hung disk fails the check instead of hanging it.
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="readyz")
        self.app = self._build(self.main, metrics=http.monitoring_listen is None)

    @property
    def config(self) -> Config:
        """The running configuration ([http] itself needs a restart: it is read at start)."""
        return self.settings.current

    def _application(
        self, listener: HTTPListener, *, metrics: bool, hint: str = ""
    ) -> web.Application:
        """An application with the probes, served through `listener`'s limits."""
        # The body limit is enforced (and the body read) by the listener's middleware.
        app = web.Application(
            client_max_size=self.config.http.max_body_size,
            middlewares=[self._observe, json_errors(hint), listener.middleware],
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if metrics:
            app.router.add_get("/metrics", self.metrics_page)
        return app

    def _build(self, listener: HTTPListener, *, metrics: bool) -> web.Application:
        hint = f" (the API is under {api.PREFIX}, described at /openapi.json)"
        app = self._application(listener, metrics=metrics, hint=hint)
        app.router.add_get("/openapi.json", self.openapi_document)
        app.router.add_post("/deploys/{id}/status", reports.handler(self.deploys))
        for route in api.ROUTES:
            app.router.add_route(route.method, api.PREFIX + route.path, self._api(route))
        app.router.add_get("/", self.root)
        sessions = Sessions(self.domain, self.config.http.public_url)
        page = KeysPage(self.domain, sessions, self.config.http.secure_cookies)
        app.router.add_routes(page.routes())
        return app

    async def start(
        self,
        main: list[socket.socket] | None = None,
        monitoring: list[socket.socket] | None = None,
    ) -> tuple[str, int] | None:
        """Start the listeners, on these sockets when they are bound already (a worker's);
        the main one's address (None if only monitoring is on)."""
        http = self.config.http
        address = None
        try:
            if http.listen is not None:
                address = await self.main.start(self.app, http.listen, main)
            if http.monitoring_listen is not None:
                self.monitoring_address = await self.monitoring.start(
                    self._application(self.monitoring, metrics=True),
                    http.monitoring_listen,
                    monitoring,
                )
                log.info(
                    "event=http_listening listener=monitoring address=%s:%d",
                    *self.monitoring_address,
                )
        except BaseException:
            await self.close()
            raise
        return address

    async def close(self) -> None:
        await self.main.close()
        await self.monitoring.close()
        self._checks.shutdown(wait=False)

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
        except StoreUnavailable as exc:
            # The registry is down (the API answers this itself; the keys page and the
            # status reports meet it here): one line, no traceback, retry later.
            status = 503
            return web.Response(status=503, text=f"{exc}\n", headers={"Retry-After": "5"})
        finally:
            self.metrics.http_requests.labels(label, str(status)).inc()
            if label not in PROBES:
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
        """Ready to serve: SSH accepting and not draining, registry readable, repository
        root writable."""
        checks: dict[str, str] = {"ssh": self.ssh_status()}
        try:
            await asyncio.wait_for(self.domain.ping(), CHECK_TIMEOUT)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {exc or type(exc).__name__}"[:200]
        loop = asyncio.get_running_loop()
        try:
            checks["repos"] = await asyncio.wait_for(
                loop.run_in_executor(self._checks, _writable, self.domain.repos.root),
                CHECK_TIMEOUT,
            )
        except TimeoutError:
            checks["repos"] = f"no answer within {CHECK_TIMEOUT:g}s"
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
                call = api.Call(request, token, self.domain, self.deploys)
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
            token = await self.domain.tokens.authenticate(secret.strip())
        if token is None:
            raise Unauthorized("missing or unknown bearer token")
        await self.domain.tokens.record_use(token)
        return token


def json_errors(hint: str) -> AiohttpMiddleware:
    """A middleware answering an unknown route, or a method a route does not take, in the
    API's JSON error shape (as every other refusal) rather than aiohttp's plain `404: Not
    Found`; `hint` says where the listener's routes are described."""

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            allowed = sorted(exc.allowed_methods)
            message = f"{request.method} is not allowed on {printable(request.path)}: use "
            return _json_error(405, "method_not_allowed", message + ", ".join(allowed), allowed)
        except web.HTTPNotFound:
            message = f"no such route: {request.method} {printable(request.path)}{hint}"
            return _json_error(404, "not_found", message)

    return answer


def _json_error(
    status: int, code: str, message: str, allowed: list[str] | None = None
) -> web.Response:
    # The path is the client's: escaped and cut, and never to be sniffed as markup.
    headers = {"X-Content-Type-Options": "nosniff"}
    if allowed:
        headers["Allow"] = ",".join(allowed)
    body = {"error": {"code": code, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _writable(root: Path) -> str:
    try:
        fd, name = tempfile.mkstemp(prefix=".ready-", dir=root)
        os.close(fd)
        os.unlink(name)
        return "ok"
    except OSError as exc:
        return f"not writable: {exc.strerror or exc}"
