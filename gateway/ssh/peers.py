"""The internal listener ([cluster] listen): git operations the other nodes forward to the
repositories this node is home to. Only addresses in [cluster] peers get a banner, and only a
client holding the nodes' shared host key logs in; tenants never reach it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncssh

from ..config import SSHSettings
from ..errors import GatewayError
from ..git.bridge import Channel
from ..logs import q
from ..textsafe import terminal_safe
from . import commands, hostkeys
from .commands import git
from .forward import NOT_HOME, PEER_USER, BadRequest, Request

if TYPE_CHECKING:
    from .server import Runtime

log = logging.getLogger("gateway.peers")


class PeerConnection(asyncssh.SSHServer):
    """One connection from another node: refused unless from a peer address; logged in only
    with the nodes' shared host key."""

    def __init__(self, peers: PeerListener) -> None:
        self.peers = peers

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        if not self.peers.allowed(address):
            log.warning("event=peer_refused address=%s reason=not_in_peers", q(address))
            conn.abort()

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
        runtime: Runtime,
        keys: Sequence[asyncssh.SSHKey],
        peers: Sequence[str],
        options: asyncssh.SSHServerConnectionOptions,
    ) -> None:
        self.runtime = runtime
        self.networks = [ipaddress.ip_network(n) for n in peers]
        self.trusted = {key.public_data for key in keys}
        self.options = options
        self.servers: list[asyncssh.SSHAcceptor] = []
        self.running: set[asyncio.Task[None]] = set()

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

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """Run one forwarded operation; the exit status is git's (NOT_HOME: not run here)."""
        task = asyncio.current_task()
        if task is not None:
            self.running.add(task)
        code = 1
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
        )
        invocation = commands.Invocation(request.service, (request.app,))
        served = await git.serve_forwarded(ctx, invocation, via=request.via)
        return NOT_HOME if served is None else served


def peer_options(
    keys: list[asyncssh.SSHKey], ssh: SSHSettings, window: int, max_packet: int
) -> asyncssh.SSHServerConnectionOptions:
    """The internal listener's SSH: the shared host keys, exec sessions only, nothing else
    (no pty, no forwarding of any kind, no sftp or scp)."""
    return asyncssh.SSHServerConnectionOptions(
        server_host_keys=hostkeys.offered(keys, ssh.signature_algorithms),
        encoding=None,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        gss_host=None,
        password_auth=False,
        kbdint_auth=False,
        kex_algs=list(ssh.kex_algorithms),
        encryption_algs=list(ssh.ciphers),
        mac_algs=list(ssh.macs),
        signature_algs=list(ssh.signature_algorithms),
        compression_algs=["none"],
        login_timeout=10,
        keepalive_interval=10,
        keepalive_count_max=3,
        window=window,
        max_pktsize=max_packet,
        server_version="git-gateway-node",
    )
