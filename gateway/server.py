"""asyncssh glue: key-only authentication bound to the verified key, sessions, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import signal
from collections.abc import Iterable

import asyncssh

from . import commands, gitbin, hostkeys
from .auth import identify
from .bridge import Channel
from .commands.dispatch import execute
from .config import Config
from .control import ControlServer
from .deploys import DeployService
from .errors import GatewayError
from .http import HTTPServer
from .logs import q
from .models import Identity
from .repos import Repositories
from .store import Store, open_store, utcnow

log = logging.getLogger("gateway.server")

# Transport tuning (measured, see ../shared/design/libraries.md): a 16 MiB window and large
# packets keep one channel at full speed on a fast link.
WINDOW = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
# Recording "last used" is a write; once a minute per key is enough.
TOUCH_INTERVAL_SECONDS = 60


class Connection(asyncssh.SSHServer):
    """One client connection: authentication state and the identity it ends with."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.id = secrets.token_hex(4)
        self.peer = "-"
        self.conn: asyncssh.SSHServerConnection | None = None
        self.identity: Identity | None = None
        self._candidate: Identity | None = None
        self.auth_attempts = 0

    # -- connection lifecycle --

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("-", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        conn.set_extra_info(gateway_connection=self)
        self.gateway.connections.add(self)
        log.debug("event=connect conn=%s peer=%s", self.id, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.connections.discard(self)
        if self.identity is None:
            log.info(
                "event=auth_failed conn=%s peer=%s attempts=%d reason=%s",
                self.id,
                self.peer,
                self.auth_attempts,
                q(str(exc) if exc else "client disconnected before authenticating"),
            )
        log.debug("event=disconnect conn=%s reason=%s", self.id, q(exc))

    # -- authentication: public keys only --

    def begin_auth(self, username: str) -> bool:
        return True  # always require authentication

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Called for unsigned probes and for signed attempts alike, so it must never decide
        # the identity by itself: it only records the candidate for this attempt.
        self._candidate = None
        self.auth_attempts += 1
        fingerprint = key.get_fingerprint("sha256")
        if username != self.gateway.config.ssh.user:
            log.info(
                "event=auth_rejected conn=%s peer=%s reason=bad_user user=%s fp=%s",
                self.id,
                self.peer,
                q(username),
                fingerprint,
            )
            return False
        identity = await identify(self.gateway.store, fingerprint)
        if identity is None:
            log.info(
                "event=auth_rejected conn=%s peer=%s reason=unknown_key fp=%s",
                self.id,
                self.peer,
                fingerprint,
            )
            return False
        self._candidate = identity
        return True

    async def auth_completed(self) -> None:
        # asyncssh completes authentication in the same step as the validate_public_key call
        # that returned True for a request whose signature it then verified; a newer request
        # cancels an older pending one. So the last candidate is the key that authenticated.
        identity = self._candidate
        if identity is None or self.conn is None:  # cannot happen with key-only auth
            if self.conn is not None:
                self.conn.abort()
            return
        self.identity = identity
        self.conn.set_extra_info(gateway_identity=identity)
        log.info(
            "event=auth_ok conn=%s peer=%s user=%s key=%s fp=%s",
            self.id,
            self.peer,
            identity.user_name,
            q(identity.key_name),
            identity.fingerprint,
        )
        await self.gateway.record_key_use(identity)


class Gateway:
    """The running service: registry, repositories, git runtime and the SSH listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: Store
        self.repos = Repositories(config.storage.repos, config.git.max_input_size)
        self.git: gitbin.Git
        self.deploys: DeployService
        self.control: ControlServer
        self.http: HTTPServer | None = None
        self.connections: set[Connection] = set()
        self.addresses: list[tuple[str, int]] = []
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._last_touch: dict[int, float] = {}

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def start(self) -> None:
        cfg = self.config
        self.git = await asyncio.to_thread(gitbin.locate, cfg.git.binary)
        log.info("event=git_found path=%s version=%s", self.git.path, self.git.version_text)
        self.store = await open_store(cfg.storage.database)
        self.deploys = DeployService(cfg, self.store, self.repos)
        self.control = ControlServer(cfg.storage.control_socket, self.deploys)
        try:
            self.repos.ensure_root()
            await self._refresh_hooks()
            await self.control.start()
            if cfg.http.listen is not None:
                self.http = HTTPServer(*cfg.http.listen, self.deploys)
                self.deploys.http_address = await self.http.start()
                log.info("event=http_listening address=%s:%d", *self.deploys.http_address)
            await self.deploys.start()
            keys = await asyncio.to_thread(hostkeys.load_or_create, cfg.ssh.host_key_dir)
            for key in keys:
                log.info(
                    "event=host_key algorithm=%s fingerprint=%s",
                    key.get_algorithm(),
                    key.get_fingerprint("sha256"),
                )
            host, port = cfg.ssh.listen
            self._acceptor = await asyncssh.listen(
                host,
                port,
                server_factory=lambda: Connection(self),
                server_host_keys=keys,
                process_factory=self.handle_process,
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
                login_timeout=cfg.ssh.login_timeout,
                keepalive_interval=cfg.ssh.keepalive_interval,
                keepalive_count_max=3,
                window=WINDOW,
                max_pktsize=MAX_PACKET,
                server_version="git-gateway",
                reuse_address=True,
            )
        except BaseException:
            await self.deploys.close()
            if self.http is not None:
                await self.http.close()
            await self.control.close()
            await self.store.close()
            raise
        self.addresses = [s.getsockname()[:2] for s in self._acceptor.sockets]
        if port == 0:
            # Port 0 asked the OS for a port: clone URLs must show the one it gave.
            ssh = dataclasses.replace(cfg.ssh, listen=(host, self.port))
            self.config = self.deploys.config = dataclasses.replace(cfg, ssh=ssh)
        for addr_host, addr_port in self.addresses:
            shown = f"[{addr_host}]" if ":" in addr_host else addr_host
            log.info("event=listening listening on %s:%d", shown, addr_port)

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        for connection in list(self.connections):
            if connection.conn is not None:
                connection.conn.close()
        await self.deploys.close()
        if self.http is not None:
            await self.http.close()
        await self.control.close()
        await self.store.close()

    async def _refresh_hooks(self) -> None:
        """Every app repository gets this version's hooks (they are generated files)."""
        for app in await self.store.list_apps():
            if self.repos.exists(app.name):
                await asyncio.to_thread(self.repos.install_hooks, app.name)

    async def serve_forever(
        self, stop_signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Start, run until SIGTERM or SIGINT, then close."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # Handlers first: once "listening on" is logged, a SIGTERM must mean a clean stop.
        for sig in stop_signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BaseException:
            for sig in stop_signals:
                loop.remove_signal_handler(sig)
            raise
        try:
            await stop.wait()
            log.info("event=stopping")
        finally:
            for sig in stop_signals:
                loop.remove_signal_handler(sig)
            await self.close()
        log.info("event=stopped")

    # -- bookkeeping --

    async def record_key_use(self, identity: Identity) -> None:
        """Update the key's "last used", at most once a minute per key (it is a write)."""
        now = asyncio.get_running_loop().time()
        last = self._last_touch.get(identity.key_id)
        if last is not None and now - last < TOUCH_INTERVAL_SECONDS:
            return
        self._last_touch[identity.key_id] = now
        try:
            await self.store.touch_key(identity.key_id, utcnow())
        except Exception:
            # Bookkeeping must never cost the user their session.
            log.exception("event=touch_key_failed key_id=%d", identity.key_id)

    # -- sessions --

    async def handle_process(self, process: asyncssh.SSHServerProcess) -> None:
        """Serve one session; never lets an exception escape (it would kill the connection)."""
        conn = process.get_extra_info("connection")
        connection: Connection = conn.get_extra_info("gateway_connection")
        stderr = process.stderr
        code = 1
        try:
            code = await self._serve(process, connection)
        except GatewayError as exc:
            code = exc.exit_code
            log.info(
                "event=refused conn=%s user=%s command=%s reason=%s",
                connection.id,
                connection.identity.user_name if connection.identity else "-",
                q(process.command),
                q(exc),
            )
            with contextlib.suppress(Exception):
                stderr.write(f"error: {exc}\n".encode())
        except Exception:
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
            with contextlib.suppress(Exception):
                process.exit(code)

    async def _serve(self, process: asyncssh.SSHServerProcess, connection: Connection) -> int:
        identity = connection.identity
        if identity is None:
            raise GatewayError("not authenticated")
        if process.subsystem is not None:
            raise GatewayError(f"subsystem '{process.subsystem}' is not supported: no sftp or scp")
        env = process.env
        # Only GIT_PROTOCOL reaches git; default client configs also send LANG and LC_*,
        # which are ignored rather than refused so that the session goes on.
        declined = sorted(k for k in env if k != "GIT_PROTOCOL")
        if declined:
            log.debug("event=env_declined conn=%s names=%s", connection.id, q(",".join(declined)))
        invocation = commands.parse(process.command)
        ctx = commands.Context(
            identity=identity,
            channel=Channel(process.stdin, process.stdout, process.stderr),
            config=self.config,
            store=self.store,
            repos=self.repos,
            git=self.git,
            deploys=self.deploys,
            client_protocol=env.get("GIT_PROTOCOL"),
            conn_id=connection.id,
            peer=connection.peer,
        )
        return await execute(ctx, invocation)
