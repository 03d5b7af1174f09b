"""The SSH listener's TCP side: bind, accept, read a PROXY header if one is due, hand off."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from ..config import SSHSettings
from ..logs import q
from ..metrics import Metrics
from . import proxy
from .accepting import Acceptor

log = logging.getLogger("gateway.listener")

BACKLOG = 1024
# When the process runs out of file descriptors, accept() fails until some close: pause
# accepting briefly instead of spinning on the error.
ACCEPT_ERROR_PAUSE = 0.1

# Receives the accepted socket, the client's address (from the PROXY header when one was
# read, else the TCP peer) and the balancer's address when the connection came through one.
Handoff = Callable[[socket.socket, tuple[str, int], tuple[str, int] | None], Awaitable[None]]


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, all on the same port."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # same port on every family
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    def __init__(self, settings: SSHSettings, handoff: Handoff, metrics: Metrics) -> None:
        self.settings = settings
        self.handoff = handoff
        self.metrics = metrics
        self.trusted_balancers = [ipaddress.ip_network(n) for n in settings.proxy_allowed]
        self.sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def accepting(self) -> bool:
        return any(not task.done() for task in self._accepting)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.sockets]

    def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Accept on `listen`, or on these sockets bound to it already (a worker's)."""
        self.sockets = sockets if sockets else bind(*self.settings.listen)
        self._accepting = [asyncio.ensure_future(self._accept(s)) for s in self.sockets]

    @property
    def logins(self) -> set[asyncio.Task[None]]:
        """Accepted connections still in their PROXY header or SSH login."""
        return set(self._handshakes)

    async def close(self) -> None:
        """Stop accepting: from now on new connections are refused. The ones the kernel has
        queued already are taken first, and every accepted connection goes on with its PROXY
        header and login (`abort` drops those still there)."""
        for task in self._accepting:
            task.cancel()
        for task in self._accepting:
            with contextlib.suppress(BaseException):
                await task
        for sock in self.sockets:
            # No await between the last accept and close: a connection the kernel completed
            # is served rather than reset (with workers, the last one to close does this).
            self._take_queued(sock)
            sock.close()
        self._accepting = []

    async def abort(self) -> None:
        """Drop the connections still in their PROXY header or login."""
        for task in list(self._handshakes):
            task.cancel()
        for task in list(self._handshakes):
            with contextlib.suppress(BaseException):
                await task

    def _take_queued(self, listening: socket.socket) -> None:
        while True:
            try:
                sock, peer = listening.accept()
            except OSError:  # nothing queued (EAGAIN), or out of descriptors: stop here
                return
            sock.setblocking(False)
            self._start_handshake(sock, (str(peer[0]), int(peer[1])))

    async def _accept(self, listening: socket.socket) -> None:
        acceptor = Acceptor(log, "accept", "ssh")
        while True:
            sock, peer = await acceptor.accept(listening)
            self._start_handshake(sock, (str(peer[0]), int(peer[1])))

    def _start_handshake(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._handshake(sock, peer))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        client, via = peer, None
        mode = self.settings.proxy_protocol
        if mode != "off":
            if proxy.trusted(peer[0], self.trusted_balancers):
                try:
                    header = await asyncio.wait_for(
                        proxy.read_header(sock, required=mode == "required"),
                        self.settings.proxy_header_timeout,
                    )
                except TimeoutError:
                    self._refuse(sock, peer, "timeout", "no complete PROXY header in time")
                    return
                except proxy.ProxyHeaderError as exc:
                    self._refuse(sock, peer, exc.reason, str(exc))
                    return
                except OSError as exc:
                    self._refuse(sock, peer, "error", exc.strerror or str(exc))
                    return
                if header is not None:
                    via = peer
                    if header.client is not None:
                        client = header.client
            elif mode == "required":
                self._refuse(sock, peer, "untrusted", "peer is not in [ssh] proxy_allowed")
                return
        try:
            await self.handoff(sock, client, via)
        except Exception as exc:
            log.debug("event=handshake_ended peer=%s:%d reason=%s", *client, q(exc))

    def _refuse(self, sock: socket.socket, peer: tuple[str, int], reason: str, detail: str) -> None:
        log.warning(
            "event=proxy_refused peer=%s:%d reason=%s detail=%s",
            peer[0],
            peer[1],
            reason,
            q(detail[:120]),
        )
        self.metrics.proxy_rejections.labels(reason).inc()
        sock.close()
