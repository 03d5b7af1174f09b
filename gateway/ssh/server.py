"""The SSH server's sessions: the asyncssh options every connection gets, and each session
channel's exec request served (the key or certificate re-checked, the rate limit, the command
run, refusals audited and explained)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from typing import Protocol

import asyncssh

from .. import executors
from ..config import Config, SSHSettings
from ..deploys import DeployService
from ..domain.access import CertificateRevoked, KeyRevoked
from ..domain.facade import Domain
from ..errors import AccessDenied, GatewayError
from ..git import gitbin
from ..git.bridge import Channel
from ..git.packcache import PackCache
from ..git.repos import Repositories
from ..logs import q
from ..metrics import Metrics
from ..models import Identity
from ..textsafe import terminal_safe
from . import certs, commands, hostkeys
from .commands import execute
from .connection import Connection
from .forward import Forwarder
from .limits import Admission, RateLimiter

# The logger of the session events before they left server.py: operators filter on it.
log = logging.getLogger("gateway.server")

# Transport tuning (measured, see ../shared/design/libraries.md): a 16 MiB window and large
# packets keep one channel at full speed on a fast link.
WINDOW = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024


class Runtime(Protocol):
    """What sessions need from the running gateway (the app implements it; the SSH layer never
    imports the app)."""

    domain: Domain
    repos: Repositories
    git: gitbin.Git
    deploys: DeployService
    metrics: Metrics
    pack_cache: PackCache | None
    admission: Admission
    forwarder: Forwarder | None

    @property
    def config(self) -> Config: ...  # the running configuration, read at use


async def options(
    ssh: SSHSettings, keys: list[asyncssh.SSHKey]
) -> asyncssh.SSHServerConnectionOptions:
    """What every connection is offered and allowed: exec sessions over public keys only."""
    return await asyncssh.SSHServerConnectionOptions.construct(
        server_host_keys=hostkeys.offered(keys, ssh.signature_algorithms),
        # Sessions come from Connection.session_requested, which counts each channel
        # as it opens; binary streams (encoding None) carry git's packs.
        encoding=None,
        # Only exec sessions are served: no pty, no forwarding of any kind, no sftp/scp.
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        # Public keys only; no GSSAPI (asyncssh enables it when gssapi is installed).
        gss_host=None,
        password_auth=False,
        kbdint_auth=False,
        kex_algs=list(ssh.kex_algorithms),
        encryption_algs=list(ssh.ciphers),
        mac_algs=list(ssh.macs),
        signature_algs=list(ssh.signature_algorithms),
        # Packs are compressed already; SSH compression would only burn CPU.
        compression_algs=["none"],
        login_timeout=ssh.login_timeout,
        keepalive_interval=ssh.keepalive_interval,
        keepalive_count_max=3,
        window=WINDOW,
        max_pktsize=MAX_PACKET,
        server_version="git-gateway",
    )


class Sessions:
    """The sessions running on this server's connections (a drain waits for them)."""

    def __init__(
        self, runtime: Runtime, cert_cas: certs.TrustedCAs, revocations: certs.Revocations
    ) -> None:
        self.runtime = runtime
        # Certificates: the CAs at start (a restart changes them), the revocation list
        # whenever its file changes.
        self.cert_cas = cert_cas
        self.revocations = revocations
        self.rate = RateLimiter(lambda: runtime.config.limits.user_ops_per_minute)
        self.running: set[asyncio.Task[None]] = set()
        # Set whenever a session starts: a drain then looks again at what runs.
        self.started = asyncio.Event()

    async def handle(self, process: asyncssh.SSHServerProcess) -> None:
        """Serve one session; never lets an exception escape (it would kill the connection)."""
        conn = process.get_extra_info("connection")
        connection: Connection = conn.get_extra_info("gateway_connection")
        stderr = process.stderr
        code = 1
        task = asyncio.current_task()
        if task is not None:
            self.running.add(task)
        connection.sessions += 1
        connection.sessions_total += 1
        self.started.set()
        stats = commands.SessionStats()
        try:
            code = await self._serve(process, connection, stats)
        except GatewayError as exc:
            code = exc.exit_code
            denied = isinstance(exc, AccessDenied | KeyRevoked)
            stats.outcome = "denied" if denied else "refused"
            if denied and connection.identity is not None:
                # Awaited, so the row exists by the time the client reads the refusal.
                await self.runtime.domain.access.denied(
                    connection.identity, connection.peer, exc, process.command or ""
                )
            log.info(
                "event=refused conn=%s user=%s command=%s reason=%s",
                connection.id,
                connection.identity.user_name if connection.identity else "-",
                q(process.command),
                q(exc),
            )
            with contextlib.suppress(Exception):
                stderr.write(f"error: {terminal_safe(str(exc))}\n".encode())
        except Exception:
            stats.outcome = "internal_error"
            reference = secrets.token_hex(4)
            log.exception(
                "event=internal_error conn=%s ref=%s command=%s",
                connection.id,
                reference,
                q(process.command),
            )
            with contextlib.suppress(Exception):
                stderr.write(f"error: internal error (reference {reference})\n".encode())
        finally:
            connection.sessions -= 1
            connection.bytes_in += stats.bytes_in
            connection.bytes_out += stats.bytes_out
            if stats.outcome != "ok":
                connection.outcome = stats.outcome
            self.runtime.metrics.commands.labels(
                commands.command_label(process.command), stats.outcome
            ).inc()
            if task is not None:
                self.running.discard(task)
            with contextlib.suppress(Exception):
                process.exit(code)

    def refresh_certificate_lists(self) -> None:
        """Re-read the CA and revocation files if they changed (blocking: off the loop)."""
        self.cert_cas.refresh()
        self.revocations.refresh()

    async def _recheck_certificate(self, identity: Identity) -> None:
        """A certificate's connection outlives neither its validity nor its revocation (its
        user is re-checked by the domain, as a key is)."""
        cert = identity.certificate
        if cert is None:  # pragma: no cover - only called for certificates
            return
        try:
            await executors.run(self.refresh_certificate_lists)
        except (OSError, ValueError) as exc:
            log.error("event=certificate_lists_unreadable reason=%s", q(exc))
            raise KeyRevoked() from None
        if self.revocations.revoked(cert.serial, cert.key_id, cert.key_fingerprint):
            raise CertificateRevoked("access denied: this certificate has been revoked")
        if cert.ca_fingerprint not in self.cert_cas:
            raise CertificateRevoked("access denied: this certificate's CA is no longer trusted")
        if time.time() >= cert.valid_before:
            raise CertificateRevoked("access denied: this certificate has expired")

    async def _serve(
        self,
        process: asyncssh.SSHServerProcess,
        connection: Connection,
        stats: commands.SessionStats,
    ) -> int:
        identity = connection.identity
        if identity is None:
            raise GatewayError("not authenticated")
        if connection.over_limit is not None:
            raise GatewayError(connection.over_limit)
        # Roles are read per command by authorize(); the key itself is re-checked here.
        if identity.certificate is not None:
            await self._recheck_certificate(identity)
        identity = await self.runtime.domain.access.recheck(identity)
        if process.subsystem is not None:
            raise GatewayError(f"subsystem '{process.subsystem}' is not supported: no sftp or scp")
        env = process.env
        # Only GIT_PROTOCOL reaches git; default client configs also send LANG and LC_*,
        # which are ignored rather than refused so that the session goes on.
        declined = sorted(k for k in env if k != "GIT_PROTOCOL")
        if declined:
            log.debug("event=env_declined conn=%s names=%s", connection.id, q(",".join(declined)))
        invocation = commands.parse(process.command)
        syntax = commands.COMMANDS.get(invocation.command)
        if invocation.command in commands.GIT_SERVICES or (syntax and syntax.rated):
            wait = self.rate.take(identity.rate_key)
            if wait > 0:
                self.runtime.metrics.limit_rejections.labels("user_ops_per_minute").inc()
                raise GatewayError(
                    f"too many git operations for {identity.user_name} (limit "
                    f"{self.runtime.config.limits.user_ops_per_minute} per minute): retry in "
                    f"{math.ceil(wait)}s"
                )
        ctx = commands.Context(
            identity=identity,
            channel=Channel(process.stdin, process.stdout, process.stderr),
            config=self.runtime.config,
            domain=self.runtime.domain,
            repos=self.runtime.repos,
            git=self.runtime.git,
            deploys=self.runtime.deploys,
            client_protocol=env.get("GIT_PROTOCOL"),
            conn_id=connection.id,
            peer=connection.peer,
            metrics=self.runtime.metrics,
            stats=stats,
            pack_cache=self.runtime.pack_cache,
            refused_keys=tuple(connection.told.unknown) if connection.told else (),
            admission=self.runtime.admission,
            forwarder=self.runtime.forwarder,
        )
        return await execute(ctx, invocation)
