"""The running gateway: registry, repositories, git runtime, SSH listener, lifecycle and the
sessions' commands (each client connection is gateway.connection)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncssh

from . import config as config_module
from . import executors
from .config import Config
from .control import ControlServer
from .deploys import DeployService, sandbox
from .domain import audit, retention
from .domain.access import CertificateRevoked, KeyExpired, KeyRevoked, recheck
from .domain.registry import Registry
from .errors import AccessDenied, ConfigError, GatewayError, NotFound, StoreUnavailable
from .git import gitbin
from .git.bridge import Channel
from .git.packcache import PackCache
from .git.repos import Repositories
from .http import WebServer
from .logs import q
from .metrics import Metrics
from .models import Identity
from .net.listener import Listener
from .ssh import certs, commands, hostkeys
from .ssh.commands.dispatch import execute
from .ssh.connection import Connection
from .ssh.explain import Explainer
from .ssh.limits import Admission, RateLimiter
from .store import Store, open_store, utcnow
from .textsafe import terminal_safe
from .workers import WorkerRole

log = logging.getLogger("gateway.server")

# Transport tuning (measured, see ../shared/design/libraries.md): a 16 MiB window and large
# packets keep one channel at full speed on a fast link.
WINDOW = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
# Recording "last used" is a write; once a minute per key is enough.
TOUCH_INTERVAL_SECONDS = 60
# On SIGTERM, seconds a client whose session has ended gets to read its last bytes and close.
CLOSE_GRACE_SECONDS = 5.0
# On a drain, how long logins in progress are waited for (see Gateway._drain).
LOGIN_GRACE_SECONDS = 10.0
# A push quarantine not touched for this long belongs to no running receive-pack.
STALE_QUARANTINE_SECONDS = 3600
# Retention is applied at start and then this often.
PRUNE_INTERVAL_SECONDS = 3600


def _ignore() -> None:
    """A signal handler that does nothing (and, unlike SIG_IGN, is not inherited by the
    processes we start)."""


class Gateway:
    """The running service: registry, repositories, git runtime and the SSH listener."""

    def __init__(self, config: Config, worker: WorkerRole | None = None) -> None:
        # One of `serve --workers N`'s processes (see gateway.workers), or None: the whole
        # node in this process.
        self.worker = worker
        self._loaded = config  # as read from the file: what a reload compares against
        config = worker.adapt(config) if worker is not None else config
        self.config = config
        self.store: Store
        self.repos = Repositories(
            config.storage.repos,
            config.git.max_input_size,
            git=config.git.binary,
            max_commit_size=config.limits.max_commit_size,
        )
        self.git: gitbin.Git
        self.deploys: DeployService
        self.control: ControlServer
        self.pack_cache: PackCache | None = None
        self.web: WebServer | None = None
        self.connections: set[Connection] = set()
        self.addresses: list[tuple[str, int]] = []
        # Connection caps hold for the node: with workers, their counts are shared.
        self.admission = Admission(
            config.limits, shared=worker.shared_counts() if worker is not None else None
        )
        self.rate = RateLimiter(config.limits.user_ops_per_minute)
        self.explainer = Explainer(
            config.ssh.help_url, config.ssh.user, lambda: self.config.ssh_command("").strip()
        )
        try:
            # Certificates: the CAs at start (a restart changes them), the revocation list
            # whenever its file changes.
            self.cert_cas = certs.TrustedCAs(config.ssh.trusted_user_ca_keys)
            self.revocations = certs.Revocations(config.ssh.revoked_certificates)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[ssh] certificates: {exc}") from None
        self.metrics = (
            Metrics(Path(worker.metrics_dir), supervisor=worker.parent)
            if worker is not None
            else Metrics()
        )
        self.sessions: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.listener: Listener | None = None
        # Set on SIGTERM: /readyz answers 503 from then on, while the listener may still accept.
        self.draining = False
        # Set whenever a session starts: the drain then looks again at what runs.
        self._session_started = asyncio.Event()
        self.auth_failures: audit.AuthFailures
        self._housekeeper: asyncio.Task[None] | None = None
        self._ssh_options: asyncssh.SSHServerConnectionOptions | None = None
        # The first key exchange and host key algorithms we offer (see kexguess).
        self.first_algorithms = ("", "")
        self._last_touch: dict[int, float] = {}

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def start(self) -> None:
        cfg = self.config
        self.git = await asyncio.to_thread(gitbin.locate, cfg.git.binary)
        log.info("event=git_found path=%s version=%s", self.git.path, self.git.version_text)
        # Before anything listens: a deploy must never run outside the sandbox it was promised.
        for warning in await sandbox.check(cfg):
            log.warning("event=sandbox_warning %s", warning)
        self.store = await open_store(cfg.storage.database)
        self.auth_failures = audit.AuthFailures(self.store)
        self.deploys = DeployService(cfg, self.store, self.repos, self.git.path)
        self.deploys.metrics = self.metrics
        self.control = ControlServer(cfg.storage.control_socket, self.deploys)
        try:
            self.repos.ensure_root()
            if self.worker is None or self.worker.prepare:
                await self._prepare_repositories()
            await self.control.start()
            if cfg.git.pack_cache:
                self.pack_cache = PackCache(
                    cfg.git,
                    self.git.path,
                    self.repos.pack_hook,
                    Path(f"{cfg.storage.control_socket}.packstats"),
                )
                await self.pack_cache.start(self.metrics)
            if cfg.http.listen is not None or cfg.http.monitoring_listen is not None:
                registry = Registry(cfg, self.store, self.repos)
                self.web = WebServer(cfg, registry, self.deploys, self.metrics, self.ssh_status)
                worker = self.worker
                self.deploys.http_address = await self.web.start(
                    worker.sockets(worker.http_fds) if worker else None,
                    worker.sockets(worker.monitoring_fds) if worker else None,
                )
                if self.deploys.http_address is not None:
                    log.info("event=http_listening address=%s:%d", *self.deploys.http_address)
            elif self.worker is not None:
                # Worker 0 serves HTTP for the node: callbacks (webhook status reports)
                # of this worker's deploys go there.
                self.deploys.http_address = self.worker.http_address
            await self.deploys.start()
            keys = await asyncio.to_thread(hostkeys.load_or_create, cfg.ssh.host_key_dir)
            for key in keys:
                log.info(
                    "event=host_key algorithm=%s fingerprint=%s",
                    key.get_algorithm(),
                    key.get_fingerprint("sha256"),
                )
            host, port = cfg.ssh.listen
            self._ssh_options = await asyncssh.SSHServerConnectionOptions.construct(
                server_host_keys=hostkeys.offered(keys, cfg.ssh.signature_algorithms),
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
                kex_algs=list(cfg.ssh.kex_algorithms),
                encryption_algs=list(cfg.ssh.ciphers),
                mac_algs=list(cfg.ssh.macs),
                signature_algs=list(cfg.ssh.signature_algorithms),
                # Packs are compressed already; SSH compression would only burn CPU.
                compression_algs=["none"],
                login_timeout=cfg.ssh.login_timeout,
                keepalive_interval=cfg.ssh.keepalive_interval,
                keepalive_count_max=3,
                window=WINDOW,
                max_pktsize=MAX_PACKET,
                server_version="git-gateway",
            )
            self.first_algorithms = (
                cfg.ssh.kex_algorithms[0],
                next(iter(self._ssh_options.server_host_keys)).decode(),
            )
            self.listener = Listener(cfg.ssh, self._handoff, self.metrics)
            self.listener.start(
                self.worker.sockets(self.worker.ssh_fds) if self.worker is not None else None
            )
        except BaseException:
            await self.deploys.close()
            if self.web is not None:
                await self.web.close()
            await self.control.close()
            if self.pack_cache is not None:
                self.pack_cache.close()
            await self.store.close()
            raise
        self.addresses = self.listener.addresses
        self._housekeeper = asyncio.ensure_future(self._housekeeping())
        if port == 0:
            # Port 0 asked the OS for a port: clone URLs must show the one it gave.
            ssh = dataclasses.replace(cfg.ssh, listen=(host, self.port))
            self.config = self.deploys.config = dataclasses.replace(cfg, ssh=ssh)
        if self.worker is not None:
            # The supervisor says "listening on" once every worker serves.
            log.info("event=worker_ready worker=%d port=%d", self.worker.index, self.port)
            self.worker.notify_ready()
            return
        for addr_host, addr_port in self.addresses:
            shown = f"[{addr_host}]" if ":" in addr_host else addr_host
            log.info("event=listening address=%s:%d", shown, addr_port)

    async def shutdown(self, hurry: asyncio.Event | None = None) -> None:
        """What SIGTERM does (`keep_accepting`, then close with the drain)."""
        reason = await self.keep_accepting(hurry or asyncio.Event())
        await self.close(drain=self.config.limits.drain_timeout, reason=reason)

    async def keep_accepting(self, hurry: asyncio.Event) -> str:
        """Not ready from now on, yet accepting for `[server] drain_accept_seconds` (until
        `hurry` is set, if sooner), so that a balancer sees the 503 on /readyz and stops
        sending connections before the listener closes; why that period ended."""
        self._begin_draining()
        accept = self.config.server.drain_accept_seconds
        log.info(
            "event=draining accept_seconds=%s drain_timeout=%s",
            accept,
            self.config.limits.drain_timeout,
        )
        if accept <= 0:
            return "accept_period_over"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), accept)
        return "second_signal" if hurry.is_set() else "accept_period_over"

    def _begin_draining(self) -> None:
        # Not ready; and queued deploys are left to other nodes at once (see DeployService).
        self.draining = True
        self.deploys.draining.set()

    async def close(self, drain: float = 0.0, reason: str = "stop") -> None:
        """Stop accepting, let logins in progress, running git operations and deploys finish
        for up to `drain` seconds, then close what is left."""
        self._begin_draining()
        if self.listener is not None:
            await self.listener.close()
            log.info(
                "event=listener_closed reason=%s logins=%d sessions=%d deploys=%d",
                reason,
                len(self.listener.logins),
                len(self.sessions),
                len(self._running_deploys()),
            )
        if drain > 0:
            await self._drain(drain)
        if self.listener is not None:
            await self.listener.abort()
        for connection in list(self.connections):
            if connection.conn is not None:
                connection.conn.close()
        await self.deploys.close()  # and the pipelines' shared clients
        if self.web is not None:
            await self.web.close()
        await self.control.close()
        if self.pack_cache is not None:
            self.pack_cache.close()
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(BaseException):
                await self._housekeeper
        # Connections closed above reported their failures: the last counts are written.
        await self.auth_failures.flush(everything=True)
        await self.store.close()

    def _running_deploys(self) -> set[asyncio.Future[Any]]:
        jobs = self.deploys.jobs.values()
        return {job.done for job in jobs if job.task is not None and not job.done.done()}

    def _still_running(self, logins: bool) -> tuple[set[asyncio.Future[Any]], list[Connection]]:
        """What the drain waits for: sessions and deploys; with `logins`, also the logins in
        progress and the authenticated connections that have not asked for their first
        command yet."""
        running = set(self.sessions) | self._running_deploys()
        fresh: list[Connection] = []
        if logins:
            if self.listener is not None:
                running |= self.listener.logins
            fresh = [
                c
                for c in self.connections
                if c.identity is not None and c.sessions_total == 0 and not c.closed.is_set()
            ]
        return {task for task in running if not task.done()}, fresh

    async def _drain(self, seconds: float) -> None:
        """Wait, until `seconds` have passed, for what the listener let in (`_still_running`,
        including sessions that start meanwhile), then for its clients to close. Logins in
        progress and connections without a command yet get LOGIN_GRACE_SECONDS only: a real client
        gets through in about a second, and a silent connection (anyone's, no key needed)
        must not hold every stop of an idle node for the whole drain."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + seconds
        login_deadline = now + min(seconds, LOGIN_GRACE_SECONDS)
        busy: set[Connection] = set()
        while True:
            self._session_started.clear()
            now = loop.time()
            logins = now < login_deadline
            running, fresh = self._still_running(logins)
            busy |= {c for c in self.connections if c.sessions > 0} | set(fresh)
            if not running and not fresh:
                break
            if now >= deadline:
                log.warning("event=drain_timeout left=%d", len(running) + len(fresh))
                return
            remaining = (login_deadline if logins else deadline) - now
            # Woken by the first to end, or by a fresh connection's first session.
            waiters = {asyncio.ensure_future(c.closed.wait()) for c in fresh}
            waiters.add(asyncio.ensure_future(self._session_started.wait()))
            try:
                await asyncio.wait(
                    running | waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
        await self._let_clients_close(busy, deadline)

    async def _let_clients_close(self, busy: set[Connection], deadline: float) -> None:
        """A finished session's last bytes may still be on their way: let those clients close
        their connections themselves rather than cut them; one that reads nothing any more
        (a stalled watcher) is not waited for beyond CLOSE_GRACE."""
        closing = {asyncio.ensure_future(c.closed.wait()) for c in busy if not c.closed.is_set()}
        if closing:
            grace = min(deadline - asyncio.get_running_loop().time(), CLOSE_GRACE_SECONDS)
            _, left = await asyncio.wait(closing, timeout=max(grace, 0.1))
            for waiter in left:
                waiter.cancel()

    async def _handoff(
        self, sock: socket.socket, client: tuple[str, int], via: tuple[str, int] | None
    ) -> None:
        """Run SSH on an accepted socket; returns once the client has authenticated."""
        await asyncssh.run_server(
            sock,
            options=self._ssh_options,
            server_factory=lambda: Connection(self, client, via),
        )

    def ssh_status(self) -> str:
        """The SSH side of /readyz."""
        if self.draining:
            return "draining"
        if self.listener is None or not self.listener.accepting:
            return "not accepting connections"
        return "ok"

    def reload(self) -> None:
        """SIGHUP: re-read the config file in the background (see `_reload`); not while
        draining (the stop is under way)."""
        if self.draining:
            log.info("event=reload_skipped reason=draining")
            return
        self.spawn(self._reload())

    async def _reload(self) -> None:
        """Re-read the config file and apply what can change while running (limits,
        deploy settings, per-app overrides, log level); the rest needs a restart. A file
        that does not validate, or asks for a sandbox that cannot be built, changes nothing."""
        try:
            new = config_module.load(self.config.source) if self.config.source else None
            if new is not None:
                for warning in await sandbox.check(new):
                    log.warning("event=sandbox_warning %s", warning)
        except ConfigError as exc:
            log.error("event=reload_failed reason=%s", q(exc))
            return
        if new is None:
            log.info("event=reload_skipped reason=no_config_file")
            return
        fixed = {"server", "ssh", "storage", "git", "http"}
        for section in sorted(fixed):
            # Compared with the file as it was at start (port 0 there is not a change).
            if getattr(new, section) != getattr(self._loaded, section):
                log.warning("event=reload_needs_restart section=%s", section)
        deploy = new.deploy
        if deploy.log_dir != self.config.deploy.log_dir:
            # Earlier deploys' logs are read from the directory the gateway started with.
            log.warning("event=reload_needs_restart setting=deploy.log_dir")
            deploy = dataclasses.replace(deploy, log_dir=self.config.deploy.log_dir)
        applied = dataclasses.replace(
            new,
            server=self.config.server,
            ssh=self.config.ssh,
            storage=self.config.storage,
            git=self.config.git,
            http=self.config.http,
            deploy=deploy,
        )
        self.config = applied
        await self.deploys.reconfigure(applied)
        if self.web is not None:
            # Apps created through the API get the new default deploy branch.
            self.web.registry.config = applied
        self.admission.settings = applied.limits
        self.rate.per_minute = applied.limits.user_ops_per_minute
        self.repos.max_commit_size = applied.limits.max_commit_size
        logging.getLogger().setLevel(applied.log.level.upper())
        log.info("event=reloaded source=%s", applied.source)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run bookkeeping in the background; close() waits for it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def audit_auth_failure(self, connection: Connection) -> None:
        """Counted in memory per source and minute; written by the housekeeping task."""
        self.auth_failures.add(
            connection.address,
            connection.failure_kind,
            connection.failure,
            fingerprint=connection.last_fingerprint if connection.auth_attempts else "",
            attempts=connection.auth_attempts,
        )

    async def _housekeeping(self) -> None:
        """Just after each minute boundary, write the last minute's failed-login counts;
        at start and every hour, apply the retention settings."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        # With workers, worker 0 applies retention for the node.
        prunes = self.worker is None or self.worker.index == 0
        while True:
            if prunes and loop.time() >= next_prune:
                next_prune = loop.time() + PRUNE_INTERVAL_SECONDS
                try:
                    await retention.prune(self.store, self.config)
                except (OSError, StoreUnavailable) as exc:  # no descriptors, disk or database
                    log.error("event=prune_failed reason=%s", q(exc))
                except Exception:
                    log.exception("event=prune_failed")
            await asyncio.sleep(60.5 - time.time() % 60)
            await self.auth_failures.flush()

    async def _prepare_repositories(self) -> None:
        """Every app repository holds exactly this version's hooks and config, and nothing
        planted while the gateway was stopped (see repoguard); push quarantines abandoned
        by a killed gateway are removed."""
        await asyncio.to_thread(self.repos.enforce_hooks_dir)
        for app in await self.store.list_apps():
            try:
                await asyncio.to_thread(self.repos.enforce, app.name)
            except OSError as exc:
                # Its git operations are refused until this is fixed (they enforce too).
                log.error("event=repo_enforce_failed app=%s error=%s", app.name, q(exc))
            if self.repos.exists(app.name):
                removed = await asyncio.to_thread(
                    self.repos.remove_stale_quarantines, app.name, STALE_QUARANTINE_SECONDS
                )
                if removed:
                    log.warning("event=stale_quarantine_removed app=%s count=%d", app.name, removed)

    async def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT, then drain (`keep_accepting`, `close`); see
        `_signal_handlers` for what further signals do."""
        loop = asyncio.get_running_loop()
        stop, hurry = asyncio.Event(), asyncio.Event()
        until_closed, until_exit = self._signal_handlers(stop, hurry)
        # Handlers first: once "listening on" is logged, a SIGTERM must mean a clean stop.
        for sig, handler in (*until_closed.items(), *until_exit.items()):
            loop.add_signal_handler(sig, handler)
        try:
            await self.start()
        except BaseException:
            for sig in (*until_closed, *until_exit):
                loop.remove_signal_handler(sig)
            raise
        # Kept while draining too: a reload is then skipped rather than a default death.
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        reason = "stop"
        try:
            await stop.wait()
            reason = await self.keep_accepting(hurry)
        finally:
            for sig in until_closed:
                loop.remove_signal_handler(sig)
            try:
                await self.close(drain=self.config.limits.drain_timeout, reason=reason)
            finally:
                for sig in (*until_exit, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        log.info("event=stopped")

    def _signal_handlers(
        self, stop: asyncio.Event, hurry: asyncio.Event
    ) -> tuple[dict[int, Callable[[], None]], dict[int, Callable[[], None]]]:
        """The handlers kept until the listener closes, and those kept until exit.

        One process: SIGTERM or SIGINT stops it; a second one while the listener still
        accepts ends that period at once (the drain follows); once the listener is closed,
        a further one stops the process at once (the default action).

        A worker: SIGTERM stops it, however many come (its supervisor forwards the node's,
        and a process-group kill or systemd's default KillMode sends one more); SIGUSR1, from
        the supervisor only, ends the accepting period; a terminal's Ctrl-C reaches it too,
        but that SIGINT is the supervisor's to count."""

        def signalled() -> None:
            (hurry if stop.is_set() else stop).set()

        def hurried() -> None:
            stop.set()
            hurry.set()

        if self.worker is None:
            return {signal.SIGTERM: signalled, signal.SIGINT: signalled}, {}
        return {}, {signal.SIGTERM: stop.set, signal.SIGUSR1: hurried, signal.SIGINT: _ignore}

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
        task = asyncio.current_task()
        if task is not None:
            self.sessions.add(task)
        connection.sessions += 1
        connection.sessions_total += 1
        self._session_started.set()
        stats = commands.SessionStats()
        try:
            code = await self._serve(process, connection, stats)
        except GatewayError as exc:
            code = exc.exit_code
            denied = isinstance(exc, AccessDenied | KeyRevoked)
            stats.outcome = "denied" if denied else "refused"
            if denied and connection.identity is not None:
                reason = {}
                if isinstance(exc, KeyRevoked):
                    expired = isinstance(exc, KeyExpired)
                    reason = {"reason": "key expired" if expired else "key no longer registered"}
                # Awaited, so the row exists by the time the client reads the refusal.
                await audit.record(
                    self.store,
                    "access_denied",
                    actor=connection.identity.user_name,
                    fingerprint=connection.identity.fingerprint,
                    source=connection.peer,
                    app=exc.name[:100] if isinstance(exc, AccessDenied) else "",
                    command=(process.command or "")[:200],
                    **reason,
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
            self.metrics.commands.labels(
                commands.command_label(process.command), stats.outcome
            ).inc()
            if task is not None:
                self.sessions.discard(task)
            with contextlib.suppress(Exception):
                process.exit(code)

    def refresh_certificate_lists(self) -> None:
        """Re-read the CA and revocation files if they changed (blocking: off the loop)."""
        self.cert_cas.refresh()
        self.revocations.refresh()

    async def _recheck_certificate(self, identity: Identity) -> None:
        """A certificate's connection outlives neither its validity, nor its revocation, nor
        its user (the same re-check per session as a key's)."""
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
        try:
            user = await self.store.get_user(identity.user_name)
        except NotFound:
            raise KeyRevoked() from None
        if user.id != identity.user_id:
            raise KeyRevoked()

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
        else:
            identity = await recheck(self.store, identity)
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
                self.metrics.limit_rejections.labels("user_ops_per_minute").inc()
                raise GatewayError(
                    f"too many git operations for {identity.user_name} (limit "
                    f"{self.config.limits.user_ops_per_minute} per minute): retry in "
                    f"{math.ceil(wait)}s"
                )
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
            metrics=self.metrics,
            stats=stats,
            pack_cache=self.pack_cache,
            refused_keys=tuple(connection.told.unknown) if connection.told else (),
            admission=self.admission,
        )
        return await execute(ctx, invocation)
