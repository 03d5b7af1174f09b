"""The running gateway, the composition root: builds the registry, repositories, git runtime,
deploys, HTTP and SSH servers from one configuration holder; starts, drains, reloads and stops
them (sessions are gateway.ssh.server's, each client connection gateway.ssh.connection's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncssh

from . import config as config_module
from . import fstype, tasks
from .config import Config, Settings
from .control import ControlServer
from .deploys import DeployService, sandbox
from .domain import retention
from .domain.facade import Domain
from .domain.homes import forwarding
from .errors import ConfigError, StoreUnavailable
from .git import gitbin
from .git.packcache import PackCache
from .git.repos import Repositories
from .http import WebServer
from .logs import q
from .metrics import Metrics
from .net.listener import Listener
from .ssh import certs, hostkeys, peers, server
from .ssh.connection import Connection
from .ssh.explain import Explainer
from .ssh.forward import Forwarder
from .ssh.limits import Admission
from .ssh.peers import PeerListener
from .store import Store, open_store
from .workers import WorkerRole

log = logging.getLogger("gateway.server")

# On SIGTERM, seconds a client whose session has ended gets to read its last bytes and close.
CLOSE_GRACE_SECONDS = 5.0
# On a drain, how long logins in progress are waited for (see Gateway._drain).
LOGIN_GRACE_SECONDS = 10.0
# A push quarantine not touched for this long belongs to no running receive-pack.
STALE_QUARANTINE_SECONDS = 3600
# Retention is applied at start and then this often.
PRUNE_INTERVAL_SECONDS = 3600


def _apply_log_level(config: Config) -> None:
    """[log] level follows a reload ([log] format needs a restart: the handler is built once)."""
    logging.getLogger().setLevel(config.log.level.upper())


def _ignore() -> None:
    """A signal handler that does nothing (and, unlike SIG_IGN, is not inherited by the
    processes we start)."""


class Gateway:
    """The running service: registry, repositories, git runtime and the SSH listener.

    Size: the composition root's whole life (build, start, drain, reload, stop) in one place;
    what it builds (SSH sessions, HTTP, deploys, the facade) lives in their own packages."""

    def __init__(self, config: Config, worker: WorkerRole | None = None) -> None:
        # One of `serve --workers N`'s processes (see gateway.workers), or None: the whole
        # node in this process.
        self.worker = worker
        # The one configuration every part reads at use (`self.config` is its current value);
        # a reload replaces it (see `_reload`).
        self.settings = Settings(config, worker.adapt(config) if worker is not None else None)
        config = self.settings.current
        self.store: Store
        self.repos = Repositories(
            config.storage.repos,
            config.git.max_input_size,
            git=config.git.binary,
            max_commit_size=lambda: self.config.limits.max_commit_size,
        )
        self.git: gitbin.Git
        self.deploys: DeployService
        self.control: ControlServer
        self.pack_cache: PackCache | None = None
        self.web: WebServer | None = None
        # Repositories served by their home node (gateway.domain.homes): the internal
        # listener other nodes forward to, and this node's connections to them.
        self.peers: PeerListener | None = None
        self.forwarder: Forwarder | None = None
        self._peer_sockets: list[socket.socket] = []
        self.connections: set[Connection] = set()
        # Connection caps hold for the node: with workers, their counts are shared.
        self.admission = Admission(
            lambda: self.config.limits,
            shared=worker.shared_counts() if worker is not None else None,
        )
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
        self.ssh = server.Sessions(self, self.cert_cas, self.revocations)
        self.metrics = (
            Metrics(Path(worker.metrics_dir), supervisor=worker.parent)
            if worker is not None
            else Metrics()
        )
        self._background: set[asyncio.Task[Any]] = set()
        self.listener: Listener | None = None
        # Set on SIGTERM: /readyz answers 503 from then on, while the listener may still accept.
        self.draining = False
        self._drain_started = 0.0
        self._closed = False
        # The domain facade: what the SSH sessions and the HTTP front end do goes through it.
        self.domain: Domain
        self._housekeeper: asyncio.Task[None] | None = None
        self._ssh_options: asyncssh.SSHServerConnectionOptions | None = None
        # The first key exchange and host key algorithms we offer (see kexguess).
        self.first_algorithms = ("", "")

    @property
    def config(self) -> Config:
        """The running configuration: read it at use, never keep a copy."""
        return self.settings.current

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the SSH listener listens (empty until it does)."""
        return self.settings.ssh_addresses

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
        self.domain = Domain(self.settings, self.store, self.repos)
        self.deploys = DeployService(self.settings, self.store, self.repos, self.git.path)
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
                self.web = WebServer(
                    self.settings, self.domain, self.deploys, self.metrics, self.ssh_status
                )
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
            forwards = forwarding(cfg)
            if forwards:
                self._bind_peers(cfg)
            else:
                kind = fstype.filesystem_of(cfg.storage.repos)
                if fstype.is_network(kind):
                    # Each node then reads through its own cache (see docs/cluster.md).
                    log.warning(
                        "event=network_filesystem_without_forwarding repos=%s type=%s",
                        q(str(cfg.storage.repos)),
                        kind,
                    )
            await self.deploys.start()
            keys = await asyncio.to_thread(hostkeys.load_or_create, cfg.ssh.host_key_dir)
            if forwards:
                await self._start_peers(cfg, keys)
            for key in keys:
                log.info(
                    "event=host_key algorithm=%s fingerprint=%s",
                    key.get_algorithm(),
                    key.get_fingerprint("sha256"),
                )
            self._ssh_options = await server.options(cfg.ssh, keys)
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
        # Port 0 asked the OS for a port: what users are shown names the one it gave.
        self.settings.bound(self.listener.addresses)
        self._housekeeper = asyncio.ensure_future(self._housekeeping())
        if self.worker is not None:
            # The supervisor says "listening on" once every worker serves.
            log.info("event=worker_ready worker=%d port=%d", self.worker.index, self.port)
            self.worker.notify_ready()
            return
        for addr_host, addr_port in self.addresses:
            shown = f"[{addr_host}]" if ":" in addr_host else addr_host
            log.info("event=listening address=%s:%d", shown, addr_port)

    def _bind_peers(self, cfg: Config) -> None:
        """The internal listener's sockets (the supervisor's, with workers), and the address
        this node registers for the others to dial."""
        inherited = self.worker.sockets(self.worker.cluster_fds) if self.worker else None
        self._peer_sockets, address = peers.bind_listener(cfg.cluster, inherited)
        self.deploys.advertise(address)

    async def _start_peers(self, cfg: Config, keys: list[asyncssh.SSHKey]) -> None:
        """Serve what the other nodes forward here; forward there what is theirs."""
        self.peers = PeerListener(
            self,
            keys,
            cfg.cluster.peers,
            await peers.peer_options(keys, cfg.ssh),
        )
        await self.peers.start(self._peer_sockets)
        self.forwarder = Forwarder(
            keys,
            cfg.ssh.kex_algorithms,
            cfg.ssh.ciphers,
            cfg.ssh.macs,
            server.WINDOW,
            server.MAX_PACKET,
        )
        self.domain.homes.serve_as(self.deploys.node)
        log.info(
            "event=forwarding node=%s address=%s",
            self.deploys.node,
            self.deploys.runner.lease.address,
        )

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
        if not self.draining:
            self._drain_started = asyncio.get_running_loop().time()
        self.draining = True
        self.deploys.draining.set()
        # No new home from the other nodes; those held are handed over in `close`.
        self.domain.homes.draining = True

    async def close(self, drain: float = 0.0, reason: str = "stop") -> None:
        """Stop accepting, let logins in progress, running git operations and deploys finish
        for up to `drain` seconds, then close what is left. Once only."""
        if self._closed:
            return
        self._closed = True
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
        if self.domain.homes.enabled:
            with contextlib.suppress(StoreUnavailable):
                if drain > 0:  # see Homes.hand_over
                    handover = min(self.config.cluster.cache_seconds, drain)
                    loop = asyncio.get_running_loop()
                    await self.domain.homes.hand_over(self._drain_started + handover - loop.time())
                # The apps with nothing running here get another home from their next
                # operation; the others when they end, or when this process leaves.
                await self.domain.homes.release()
        if drain > 0:
            await self._drain(drain)
        if self.listener is not None:
            await self.listener.abort()
        if self.peers is not None:
            await self.peers.close(CLOSE_GRACE_SECONDS)
        if self.forwarder is not None:
            await self.forwarder.close()
        for connection in list(self.connections):
            if connection.conn is not None:
                connection.conn.close()
        # Before leaving (the node's homes go with it): no git of this node still writes.
        await tasks.end(self.sessions, CLOSE_GRACE_SECONDS)
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
        await self.domain.access.flush_failures(everything=True)
        await self.store.close()

    def _running_deploys(self) -> set[asyncio.Future[Any]]:
        jobs = self.deploys.jobs.values()
        return {job.done for job in jobs if job.task is not None and not job.done.done()}

    def _still_running(self, logins: bool) -> tuple[set[asyncio.Future[Any]], list[Connection]]:
        """What the drain waits for: sessions and deploys; with `logins`, also the logins in
        progress and the authenticated connections that have not asked for their first
        command yet."""
        running = set(self.sessions) | self._running_deploys()
        if self.peers is not None:
            running |= self.peers.running
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
            self.ssh.started.clear()
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
            waiters.add(asyncio.ensure_future(self.ssh.started.wait()))
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
        """Re-read the config file and run what can change while running (see
        `Settings.reload`); the rest is logged as needing a restart. A file that does not
        validate, or asks for a sandbox that cannot be built, changes nothing."""
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
        for name in self.settings.reload(new):
            # Restart-only sections are compared with the file as it was at start (port 0
            # there is not a change); keys, with what runs.
            log.warning(
                "event=reload_needs_restart %s=%s", "setting" if "." in name else "section", name
            )
        # What acts on a change rather than reading the settings at use: the log level, and
        # the deploy queue (a raised max_parallel claims waiting deploys at once).
        _apply_log_level(self.config)
        await self.deploys.reconfigure()
        log.info("event=reloaded source=%s", self.config.source)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run bookkeeping in the background; close() waits for it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
            await self.domain.access.flush_failures()

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

    # -- sessions (gateway/ssh/server.py serves them) --

    async def handle_process(self, process: asyncssh.SSHServerProcess) -> None:
        await self.ssh.handle(process)

    def refresh_certificate_lists(self) -> None:
        self.ssh.refresh_certificate_lists()

    @property
    def sessions(self) -> set[asyncio.Task[None]]:
        """The sessions running now (a drain waits for them)."""
        return self.ssh.running
