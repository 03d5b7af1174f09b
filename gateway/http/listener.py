"""The HTTP listeners' TCP side: accept, cap connections, bound each request in time and size.

aiohttp serves the requests, but its own server leaves three things to us, and an accept
loop of our own handing sockets to aiohttp's protocol does them:

- **A deadline for headers.** aiohttp has none as such: its keep-alive timer covers a
  connection's first request only in some versions, and nothing bounds the delivery of an
  answer to a client that does not read it. Each connection here is wrapped in a `Guard`
  that arms one timer when the connection opens and again when an answer is handed back,
  and disarms it when a request's headers are complete (the middleware runs): the headers,
  and the previous answer's delivery, get `header_timeout` seconds whatever the client
  trickles; then the connection is dropped.
- **A deadline and a size limit for bodies.** The middleware reads the whole body before
  any handler runs, within `body_timeout`, and refuses one declared or found larger than
  `max_body_size` (413) without reading it; after refusing, at most `DISCARD_LIMIT` more
  bytes are taken in (so that the client sees the answer) before the connection is dropped.
- **A connection cap and calm under descriptor exhaustion.** asyncio's own accept loop logs
  a traceback every second while the process is out of file descriptors. Here accept errors
  pause accepting with a growing delay (see `gateway.net.accepting`), logged once and then at
  most once a minute; connections over `max_connections` get a 503 and are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import __version__ as aiohttp_version
from aiohttp import web

from ..config import HTTPSettings
from ..logs import Throttle, q
from ..metrics import Metrics
from ..net.accepting import Acceptor
from ..net.listener import bind

log = logging.getLogger("gateway.http")

# After a body is refused, this much more of it is read and thrown away, so that a client
# still sending gets to read the answer; past it, the connection is dropped.
DISCARD_LIMIT = 64 * 1024
# aiohttp's lingering close (reading an unread body after the answer) never lasts longer.
LINGER_SECONDS = 2.0
# On shutdown, requests in progress get this long to finish.
SHUTDOWN_GRACE = 10.0
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, with the header deadline around it."""

    def __init__(self, listener: HTTPListener, inner: asyncio.Protocol) -> None:
        self.listener = listener
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._discard: int | None = None  # bytes still allowed in after a refused body

    # -- what the middleware tells us --

    def request_started(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_ended(self, refused_body: bool) -> None:
        if refused_body:
            self._discard = DISCARD_LIMIT
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.listener.settings.header_timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self.listener.note("http_header_timeout", "no complete request in time")
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol, passed on to aiohttp --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener.track(self)
        self._arm()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.listener.forget(self)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discard is not None:
            self._discard -= len(data)
            if self._discard < 0 and self.transport is not None:
                self.transport.abort()
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class HTTPListener:
    """Serves one aiohttp application on one address with the limits of `HTTPSettings`."""

    def __init__(self, name: str, settings: HTTPSettings, metrics: Metrics) -> None:
        self.name = name
        self.settings = settings
        self.metrics = metrics
        self.throttle = Throttle()
        self.sockets: list[socket.socket] = []
        self._runner: web.AppRunner | None = None
        self._guards: dict[Any, Guard] = {}  # aiohttp protocol -> its guard
        self._accepting: list[asyncio.Task[None]] = []

    @property
    def open(self) -> int:
        return len(self._guards)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.sockets]

    def runner(self, app: web.Application) -> web.AppRunner:
        return web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_GRACE,
            # aiohttp's idle keep-alive timer agrees with the header deadline.
            keepalive_timeout=self.settings.header_timeout,
            lingering_time=LINGER_SECONDS,
            # Compressed request bodies would be a way around the size limit: not taken.
            auto_decompress=False,
        )

    async def start(
        self,
        app: web.Application,
        address: tuple[str, int],
        sockets: list[socket.socket] | None = None,
    ) -> tuple[str, int]:
        """Serve `app` on `address`, or on `sockets` already bound to it (a worker's,
        inherited from the supervisor)."""
        self._runner = self.runner(app)
        await self._runner.setup()
        try:
            # aiohttp drops every option it does not know, silently but for a warning: an
            # unexpected version must not run without them.
            probe = self._runner.server() if self._runner.server is not None else None
            if probe is None or probe.keepalive_timeout != self.settings.header_timeout:
                raise RuntimeError(f"aiohttp {aiohttp_version} ignored the HTTP listener options")
            self.sockets = sockets if sockets else bind(*address)
        except BaseException:
            await self._runner.cleanup()
            raise
        self._accepting = [asyncio.ensure_future(self._accept(s)) for s in self.sockets]
        host, port = self.addresses[0]
        return str(host), int(port)

    async def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        for task in self._accepting:
            with contextlib.suppress(BaseException):
                await task
        self._accepting = []
        for sock in self.sockets:
            sock.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def note(self, limit: str, detail: str) -> None:
        """A limit refused something: count it, and log it unless that would flood."""
        self.metrics.limit_rejections.labels(limit).inc()
        held = self.throttle.allow(limit)
        if held is not None:
            log.warning(
                "event=http_limit listener=%s limit=%s detail=%s held_back=%d",
                self.name,
                limit,
                q(detail),
                held,
            )

    def track(self, guard: Guard) -> None:
        self._guards[guard.inner] = guard

    def forget(self, guard: Guard) -> None:
        self._guards.pop(guard.inner, None)

    # -- accepting --

    async def _accept(self, listening: socket.socket) -> None:
        acceptor = Acceptor(log, "http_accept", self.name)
        while True:
            sock, _ = await acceptor.accept(listening)
            if self.open >= self.settings.max_connections:
                self._refuse(sock)
                continue
            try:
                await self._serve(sock)
            except OSError as exc:
                log.debug("event=http_handoff_failed listener=%s reason=%s", self.name, q(exc))
                sock.close()

    def _refuse(self, sock: socket.socket) -> None:
        self.note("http_max_connections", f"more than {self.settings.max_connections} open")
        with contextlib.suppress(OSError):
            sock.send(_BUSY)  # non-blocking; a fresh socket's buffer has room for it
        sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        server = self._runner.server if self._runner is not None else None
        if server is None:  # closing
            sock.close()
            return

        # The guard counts once connected (connection_made), until connection_lost.
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: Guard(self, server()), sock
        )

    # -- the middleware every application served here goes through --

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = self._guards.get(request.protocol)
        if guard is not None:
            guard.request_started()
        refused = False
        try:
            refusal = await self._read_body(request)
            if refusal is not None:
                refused = True
                return refusal
            return await handler(request)
        finally:
            if guard is not None:
                guard.request_ended(refused)

    async def _read_body(self, request: web.Request) -> web.Response | None:
        """Read the whole body in time and within the size limit (handlers then get it from
        aiohttp's cache: request.read(), .json(), .post() for urlencoded forms); or the
        answer refusing it."""
        if not request.body_exists:
            return None
        limit = self.settings.max_body_size
        if request.content_length is not None and request.content_length > limit:
            self.note("http_max_body_size", f"declared {request.content_length} bytes")
            return _refusal(413, "payload_too_large", f"the body exceeds {limit} bytes")
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.note("http_max_body_size", "chunked body over the limit")
            return _refusal(413, "payload_too_large", f"the body exceeds {limit} bytes")
        except TimeoutError:
            self.note("http_body_timeout", "body not received in time")
            return _refusal(
                408,
                "request_timeout",
                f"the body did not arrive within {self.settings.body_timeout:g}s",
            )
        return None


def _refusal(status: int, code: str, message: str) -> web.Response:
    response = web.json_response({"error": {"code": code, "message": message}}, status=status)
    response.force_close()  # the rest of the body is not read: this connection is done
    return response
