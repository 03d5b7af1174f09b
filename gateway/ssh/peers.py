"""The internal listener ([cluster] listen): git operations the other nodes forward to the
repositories this node is home to. A connection from outside [cluster] peers is cut at once,
and only a client holding the nodes' shared host key logs in."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Sequence

import asyncssh

from .. import tasks
from ..config import ClusterSettings, SSHSettings
from ..domain.access import KeyRevoked
from ..errors import AccessDenied, ConfigError, GatewayError
from ..git.bridge import Channel
from ..logs import q
from ..net.listener import bind
from ..textsafe import terminal_safe
from . import commands, server
from .commands import git
from .forward import NOT_HOME, PEER_USER, SERVING, BadRequest, Request

log = logging.getLogger("gateway.peers")

MAX_CONNECTIONS = 256
MAX_LOGGING_IN = 16


class PeerConnection(asyncssh.SSHServer):
    """One connection from another node: refused unless from a peer address; logged in only
    with the nodes' shared host key."""

    def __init__(self, peers: PeerListener) -> None:
        self.peers = peers
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        if not self.peers.allowed(address):
            self.peers.refused(address, "not_in_peers")
            conn.abort()
            return
        # The nodes keep one connection each per worker: these caps are far above that, and
        # hold anyone else who gets past the address (a deploy on a node) to a few sockets.
        if len(self.peers.connections) >= MAX_CONNECTIONS or (
            len(self.peers.logging_in) >= MAX_LOGGING_IN
        ):
            self.peers.refused(address, "too_many_connections")
            conn.abort()
            return
        self.conn = conn
        self.peers.connections.add(conn)
        self.peers.logging_in.add(conn)

    def auth_completed(self) -> None:
        if self.conn is not None:
            self.peers.logging_in.discard(self.conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.peers.connections.discard(self.conn)
            self.peers.logging_in.discard(self.conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == PEER_USER and key.public_data in self.peers.trusted


class PeerListener:
    """Serve forwarded operations on the listening sockets given (the supervisor's, shared by
    every worker of the node, or this process's own)."""

    def __init__(
        self,
        runtime: server.Runtime,
        keys: Sequence[asyncssh.SSHKey],
        peers: Sequence[str],
        options: asyncssh.SSHServerConnectionOptions,
    ) -> None:
        self.runtime = runtime
        self.networks = [ipaddress.ip_network(n) for n in peers]
        self.trusted = {key.public_data for key in keys}
        self.options = options
        self.servers: list[asyncssh.SSHAcceptor] = []
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self.logging_in: set[asyncssh.SSHServerConnection] = set()
        self.running: set[asyncio.Task[None]] = set()
        self._refusals_logged = 0.0

    def allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    async def start(self, sockets: Sequence[socket.socket]) -> None:
        for sock in sockets:
            self.servers.append(
                await asyncssh.listen(
                    sock=sock,
                    server_factory=lambda: PeerConnection(self),
                    process_factory=self.handle,
                    options=self.options,
                )
            )

    def refused(self, address: str, reason: str) -> None:
        """Log a refused connection, at most once a second (anyone who reaches the port can
        make refusals)."""
        now = time.monotonic()
        if now - self._refusals_logged >= 1.0:
            self._refusals_logged = now
            log.warning("event=peer_refused address=%s reason=%s", q(address), reason)

    def stop_accepting(self) -> None:
        for acceptor in self.servers:
            acceptor.close()

    async def close(self, grace: float) -> None:
        """Stop accepting, cut the other nodes' connections, and give what runs `grace`
        seconds to end (a push cut from its entry node finishes on its own, as git does
        for a client gone); then stop it. Nothing forwarded runs here afterwards: the node
        may leave, and another take its homes."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close()
        await tasks.end(self.running, grace)

    async def handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """Run one forwarded operation; the exit status is git's (NOT_HOME: not run here)."""
        task = asyncio.current_task()
        if task is not None:
            self.running.add(task)
        code = 1
        request: Request | None = None
        try:
            request = Request.decode(process.command)
            if request.service not in commands.GIT_SERVICES:
                raise BadRequest("not a forwarded operation (service)")
            code = await self._serve(process, request)
        except BadRequest as exc:
            conn = process.get_extra_info("connection")
            log.warning(
                "event=peer_bad_request peer=%s reason=%s",
                q(str(conn.get_extra_info("peername"))),
                q(exc),
            )
            with contextlib.suppress(Exception):
                process.stderr.write(b"error: not a forwarded operation\n")
        except GatewayError as exc:
            code = exc.exit_code
            if request is not None and isinstance(exc, AccessDenied | KeyRevoked):
                # Rights removed between the entry's check and this one: audited here.
                await self.runtime.domain.access.denied(
                    request.identity, request.peer, exc, request.service
                )
            log.info(
                "event=refused conn=%s user=%s command=%s reason=%s",
                request.conn if request else "-",
                request.identity.user_name if request else "-",
                request.service if request else "-",
                q(exc),
            )
            with contextlib.suppress(Exception):
                process.stderr.write(f"error: {terminal_safe(str(exc))}\n".encode())
        except Exception:
            reference = secrets.token_hex(4)
            log.exception("event=internal_error ref=%s command=forwarded", reference)
            with contextlib.suppress(Exception):
                process.stderr.write(f"error: internal error (reference {reference})\n".encode())
        finally:
            if task is not None:
                self.running.discard(task)
            with contextlib.suppress(Exception):
                process.exit(code)

    async def _serve(self, process: asyncssh.SSHServerProcess[bytes], request: Request) -> int:
        runtime = self.runtime
        ctx = commands.Context(
            identity=request.identity,
            channel=Channel(process.stdin, process.stdout, process.stderr),
            config=runtime.config,
            domain=runtime.domain,
            repos=runtime.repos,
            git=runtime.git,
            deploys=runtime.deploys,
            metrics=runtime.metrics,
            client_protocol=request.protocol,
            conn_id=request.conn,
            peer=request.peer,
            pack_cache=runtime.pack_cache,
            admission=runtime.admission,
        )

        def serving() -> None:
            process.stdout.write(SERVING)

        invocation = commands.Invocation(request.service, (request.app,))
        served = await git.serve_forwarded(ctx, invocation, request.via, serving)
        return NOT_HOME if served is None else served


async def peer_options(
    keys: list[asyncssh.SSHKey], ssh: SSHSettings
) -> asyncssh.SSHServerConnectionOptions:
    """The internal listener's SSH: the public port's (the shared host keys, exec sessions
    only, nothing else), with a shorter login and keepalive, and its own name."""
    return await server.options(
        ssh,
        keys,
        login_timeout=10,
        keepalive_interval=10,
        server_version="git-gateway-node",
    )


def bind_listener(
    cluster: ClusterSettings, inherited: list[socket.socket] | None
) -> tuple[list[socket.socket], str]:
    """The internal listener's sockets (`inherited` from the supervisor, or bound here) and
    the address the other nodes dial: [cluster] advertise, else listen's host, with the port
    bound when it names none (port 0)."""
    listen = cluster.listen
    if listen is None:
        raise ConfigError("[cluster] listen is not set")
    if inherited is not None:
        sockets = inherited
    else:
        try:
            sockets = bind(*listen)
        except OSError as exc:
            raise ConfigError(
                f"[cluster] listen: cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}"
            ) from None
    address = cluster.advertise
    if not address:
        address = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
    if ":" not in address.rsplit("]", 1)[-1]:
        address = f"{address}:{sockets[0].getsockname()[1]}"
    return sockets, address
