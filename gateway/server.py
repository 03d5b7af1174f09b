"""asyncssh glue: key-only authentication bound to the verified key, sessions, lifecycle."""

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
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.packet import String

from . import audit, certs, commands, executors, gitbin, hostkeys, kexguess, retention, times
from . import config as config_module
from .auth import CertificateRevoked, KeyExpired, KeyRevoked, identify, recheck
from .bridge import Channel
from .commands.dispatch import execute
from .config import Config
from .control import ControlServer
from .deploys import DeployService, sandbox, webhook
from .errors import AccessDenied, ConfigError, GatewayError, NotFound, StoreUnavailable
from .explain import Explainer, Told
from .limits import Admission, RateLimiter
from .listener import Listener
from .logs import q
from .metrics import Metrics
from .models import CertInfo, Identity
from .names import USER_NAME
from .packcache import PackCache
from .possession import Proofs, Refusal, Verify
from .repos import Repositories
from .service import Registry
from .store import Store, open_store, utcnow
from .textsafe import terminal_safe
from .web import WebServer
from .workers import WorkerRole

log = logging.getLogger("gateway.server")

# Transport tuning (measured, see ../shared/design/libraries.md): a 16 MiB window and large
# packets keep one channel at full speed on a fast link.
WINDOW = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
# Recording "last used" is a write; once a minute per key is enough.
TOUCH_INTERVAL_SECONDS = 60
NO_AUTH = "client disconnected before authenticating"
# On SIGTERM, seconds a client whose session has ended gets to read its last bytes and close.
CLOSE_GRACE_SECONDS = 5.0
# A push quarantine not touched for this long belongs to no running receive-pack.
STALE_QUARANTINE_SECONDS = 3600
# Retention is applied at start and then this often.
PRUNE_INTERVAL_SECONDS = 3600


MAX_GIT_PROTOCOL = 256


def decline_env_requests(conn: asyncssh.SSHServerConnection) -> None:
    """Make this connection's session channels accept only a GIT_PROTOCOL env request.

    asyncssh stores every env request a client sends, without limit; declining the others
    at the SSH layer keeps them out of memory as well as away from git. It relies on
    asyncssh's channel request dispatch (`_process_<name>_request`), checked at install
    time; without it, the variables are still ignored when git is spawned.
    """
    create = conn.create_server_channel

    def create_filtered(*args: Any, **kwargs: Any) -> asyncssh.SSHServerChannel:
        channel = create(*args, **kwargs)
        env = getattr(channel, "_env", None)
        if not isinstance(env, dict) or not hasattr(channel, "_process_env_request"):
            log.warning("event=env_filter_unavailable asyncssh=%s", asyncssh.__version__)
            return channel

        def env_request(packet: Any) -> bool:
            name, value = packet.get_string(), packet.get_string()
            packet.check_end()
            if name == b"GIT_PROTOCOL" and len(value) <= MAX_GIT_PROTOCOL:
                env[name] = value
                return True
            return False  # declined; OpenSSH clients go on (default configs send LANG, LC_*)

        channel._process_env_request = env_request  # type: ignore[attr-defined]
        return channel

    conn.create_server_channel = create_filtered  # type: ignore[method-assign]


def negotiated(conn: asyncssh.SSHServerConnection) -> tuple[str, str]:
    """The cipher and MAC this connection's client chose, for the operator's log: the crypto
    policy offers several, and which clients still need which is what decides removing one."""
    cipher = str(conn.get_extra_info("recv_cipher") or "-")
    mac = str(conn.get_extra_info("recv_mac") or "-")
    # AEAD ciphers (AES-GCM, chacha20-poly1305) authenticate themselves; asyncssh then
    # reports the cipher's name as the MAC.
    return cipher, "implicit" if mac == cipher else mac


def quick_acks(conn: asyncssh.SSHServerConnection) -> None:
    """Acknowledge at once instead of delaying ACKs (Linux TCP_QUICKACK).

    OpenSSH clients leave Nagle on until the session starts, so during the handshake their
    next small packet waits for our ACK of the previous one, which Linux delays by up to
    40 ms when it has nothing to send: two such stalls made a login take ~60 ms instead of
    ~15. The kernel can drop back to delayed ACKs, so this is re-armed on every read.
    """
    sock = conn.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or quickack is None:
        return
    protocol_received = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        protocol_received(data, datatype)

    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        conn.data_received = data_received  # type: ignore[method-assign]


class SessionChannel(asyncssh.SSHServerProcess):  # type: ignore[type-arg]
    """One session channel, counted against its connection's limit from the moment it is
    opened until it closes.

    A channel costs memory as soon as it is open, before any request arrives: counting only
    running commands would let a client hold thousands of idle channels. One that asks for
    nothing (exec, shell or subsystem) within `channel_request_timeout` is closed.
    """

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection.gateway.handle_process, None, 0, False)
        self.owner = connection
        self._timer: asyncio.TimerHandle | None = None
        self._opened: Any = None  # the channel, once asyncssh has made it

    def connection_made(self, chan: Any) -> None:
        super().connection_made(chan)
        self._opened = chan
        timeout = self.owner.gateway.config.limits.channel_request_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._request_timeout)

    def session_started(self) -> None:
        self._cancel_timer()
        super().session_started()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.owner.session_channels.discard(self)
        super().connection_lost(exc)

    @property
    def open(self) -> bool:
        """Still holding a slot: not yet closing. asyncssh reports the final close a loop turn
        after the CLOSE messages; a client that opens its next channel in that same turn
        (multiplexed clients do) must find the slot free."""
        return self._opened is None or not self._opened.is_closing()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _request_timeout(self) -> None:
        self._timer = None
        self.owner.channels_timed_out += 1
        if self.owner.channels_timed_out == 1:  # once per connection: no log flood
            log.info(
                "event=channel_closed conn=%s reason=no_request_in=%ss",
                self.owner.id,
                self.owner.gateway.config.limits.channel_request_timeout,
            )
        self.channel.close()


class Connection(asyncssh.SSHServer):
    """One client connection: authentication state and the identity it ends with."""

    def __init__(
        self,
        gateway: Gateway,
        client: tuple[str, int] | None = None,
        via: tuple[str, int] | None = None,
    ) -> None:
        self.gateway = gateway
        self.id = secrets.token_hex(4)
        # The client's address: from the PROXY header when a trusted balancer sent one.
        self.client = client
        self.via = f"{via[0]}:{via[1]}" if via else "-"
        self.peer = "-"
        self.started = time.monotonic()
        self.failure_kind = "disconnected"
        self.conn: asyncssh.SSHServerConnection | None = None
        self.identity: Identity | None = None
        self._candidate: Identity | None = None
        self.auth_attempts = 0
        self.last_fingerprint = "-"
        self.address = "-"
        self.admitted = False
        self.sessions = 0  # commands running
        self.sessions_total = 0
        # Session channels open, with or without a command yet.
        self.session_channels: set[SessionChannel] = set()
        self.channels_refused = 0
        self.channels_timed_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.outcome = "ok"
        self.failure = NO_AUTH
        self.closed = asyncio.Event()
        # Registered keys that may not log in: explained once the client proves it holds one.
        self.proofs = Proofs(self._refusal_proven, self._certificate, self._new_request)
        self.told: Told | None = None  # what a refused client was told (banners)

    # -- connection lifecycle --

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = self.client or conn.get_extra_info("peername") or ("-", 0)
        self.address = str(peer[0])
        self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        metrics = self.gateway.metrics
        refused = self.gateway.admission.admit(self.address)
        if refused is not None:
            # Closed before our banner, as OpenSSH does past MaxStartups: the client sees
            # "Connection closed by remote host" and may retry.
            log.warning(
                "event=connection_refused conn=%s peer=%s via=%s reason=%s",
                self.id,
                self.peer,
                self.via,
                refused,
            )
            metrics.limit_rejections.labels(refused).inc()
            conn.abort()
            return
        self.admitted = True
        metrics.connections.inc()
        metrics.connections_open.inc()
        quick_acks(conn)
        decline_env_requests(conn)
        self.told = Told(self.gateway.explainer, self.address)
        if self.client is not None and hasattr(conn, "_peer_addr"):
            # asyncssh checks a certificate's source-address against the TCP peer: behind a
            # trusted balancer, that is the client the PROXY header names.
            conn._peer_addr = str(self.client[0])
        if not self.proofs.install(conn):
            log.warning("event=key_proof_unavailable asyncssh=%s", asyncssh.__version__)
        kexguess.judge_guesses_by_rfc(conn, *self.gateway.first_algorithms)
        conn.set_extra_info(gateway_connection=self)
        self.gateway.connections.add(self)
        log.info("event=connect conn=%s peer=%s via=%s", self.id, self.peer, self.via)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        if not self.admitted:
            return
        metrics = self.gateway.metrics
        metrics.connections_open.dec()
        self.gateway.connections.discard(self)
        self.gateway.admission.release(self.address, self.identity is not None)
        if self.identity is None:
            if self.failure == NO_AUTH and exc is not None:
                self.failure = str(exc) or type(exc).__name__
            metrics.auth.labels(self.failure_kind).inc()
            log.info(
                "event=auth_failed conn=%s peer=%s attempts=%d fp=%s reason=%s",
                self.id,
                self.peer,
                self.auth_attempts,
                self.last_fingerprint,
                q(self.failure),
            )
            self.gateway.audit_auth_failure(self)
        # One line per connection that ties it together: who, how long, how much, how it ended.
        log.info(
            "event=disconnect conn=%s peer=%s user=%s fp=%s sessions=%d channels_refused=%d "
            "channels_timed_out=%d bytes_in=%d bytes_out=%d duration=%.3f outcome=%s reason=%s",
            self.id,
            self.peer,
            self.identity.user_name if self.identity else "-",
            self.identity.fingerprint if self.identity else self.last_fingerprint,
            self.sessions_total,
            self.channels_refused,
            self.channels_timed_out,
            self.bytes_in,
            self.bytes_out,
            time.monotonic() - self.started,
            self.outcome if self.identity else "auth_failed",
            q(exc) if exc else "closed",
        )

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

    def _new_request(self) -> None:
        # Whatever a request decides, the identity comes only from the one that completes.
        self._candidate = None

    def _attempt(self, username: str, fingerprint: str) -> bool:
        """Count one key or certificate offered; False (and why, told) for a wrong user."""
        self._candidate = None
        self.auth_attempts += 1
        self.last_fingerprint = fingerprint
        if self.auth_attempts > self.gateway.config.limits.max_auth_attempts:
            # asyncssh has no MaxAuthTries: count every key offered (probes too, since an
            # agent with many keys burns one try per key) and disconnect past the limit.
            self.failure = "too many authentication attempts"
            self.failure_kind = "too_many_attempts"
            self.gateway.metrics.limit_rejections.labels("max_auth_attempts").inc()
            if self.auth_attempts == self.gateway.config.limits.max_auth_attempts + 1:
                self._banner(lambda told: told.lines_for_too_many(self.auth_attempts - 1))
            raise asyncssh.PermissionDenied("Too many authentication failures")
        if username != self.gateway.config.ssh.user:
            log.info(
                "event=auth_rejected conn=%s peer=%s reason=bad_user user=%s fp=%s",
                self.id,
                self.peer,
                q(username),
                fingerprint,
            )
            self.failure = f"SSH user '{username}' is not accepted"
            self.failure_kind = "bad_user"
            self._banner(lambda told: told.lines_for_bad_user())
            return False
        return True

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Only reached through _certificate (which decided everything else) while the
        # request wrapper is installed; without it, no certificate gets in.
        return self.proofs.installed and key.get_fingerprint("sha256") in self.gateway.cert_cas

    async def _certificate(
        self, username: str, key_data: bytes, msg: bytes, signature: bytes, verify: Verify
    ) -> bool | None:
        """An auth request with an OpenSSH user certificate (None: not a certificate). The
        policy is ours (certs.check); asyncssh then checks the CA's signature, the validity
        window, the principal and the client's signature (`verify`)."""
        decoded = certs.decode(key_data)
        if decoded is None:
            return None
        fingerprint = decoded.key.get_fingerprint("sha256") if not isinstance(decoded, str) else "-"
        if not self._attempt(username, fingerprint):
            return False
        gateway = self.gateway
        if isinstance(decoded, str) or not gateway.cert_cas:
            # Said at once: about the certificate's format, or this server's configuration.
            why = decoded if isinstance(decoded, str) else "SSH certificates are not accepted here"
            return self._certificate_refused(why, fingerprint)
        try:
            await executors.run(gateway.refresh_certificate_lists)
            info = certs.check(decoded, gateway.cert_cas, gateway.revocations, self.address)
        except certs.CertificateRefused as exc:
            # Whether it is revoked, or its CA trusted, is told only to whoever holds the
            # certified key: the probe gets "go on", the signed request the reason.
            if not msg:
                return True
            if self._holds(decoded.key, msg, signature):
                self._certificate_refused(f"the certificate is refused: {exc}", fingerprint)
            return False
        except (OSError, ValueError) as exc:  # a CA or revocation file unreadable: fail closed
            log.error("event=certificate_lists_unreadable reason=%s", q(exc))
            return self._certificate_refused("the certificate cannot be checked now", fingerprint)
        users: dict[str, tuple[str, int]] = {}
        for principal, name in certs.candidates(decoded, self.gateway.config.ssh.principals):
            if name in users or not USER_NAME.fullmatch(name):
                continue
            try:
                user = await self.gateway.store.get_user(name)
            except NotFound:
                continue
            users[name] = (principal, user.id)
        if len(users) != 1:
            # Said only once the client proved it holds the certified key (the principals'
            # accounts are the registry's business).
            why = "names no account here" if not users else "names several accounts"
            accepted = await verify(decoded.principals[0], key_data, msg, signature)
            if accepted and msg:
                self._certificate_refused(f"the certificate {why}", fingerprint, info)
                return False
            return accepted
        [(name, (principal, user_id))] = users.items()
        identity = Identity(
            user_id,
            name,
            0,
            info.key_id,
            info.key_fingerprint,
            certificate=dataclasses.replace(info, principal=principal),
        )
        accepted = await verify(principal, key_data, msg, signature)
        if accepted:
            self._candidate = identity
        return accepted

    def _holds(self, key: asyncssh.SSHKey, msg: bytes, signature: bytes) -> bool:
        """Did the client sign this request with `key` (asyncssh's own check, for a request
        asyncssh is not asked to accept)? False when it cannot be told."""
        session_id = getattr(self.conn, "_session_id", None)
        if not isinstance(session_id, bytes) or not msg:
            return False
        try:
            return bool(key.verify(String(session_id) + msg, signature))
        except Exception:  # a malformed signature proves nothing
            return False

    def _certificate_refused(
        self, why: str, fingerprint: str, info: CertInfo | None = None
    ) -> bool:
        shown = f" {info.key_id!r} (serial {info.serial})" if info else ""
        log.info(
            "event=auth_rejected conn=%s peer=%s reason=certificate fp=%s detail=%s",
            self.id,
            self.peer,
            fingerprint,
            q(why + shown),
        )
        self.failure = why
        self.failure_kind = "certificate"
        self._banner(lambda _: [f"git-gateway: {why}{shown}."])
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Called for unsigned probes and for signed attempts alike, so it must never decide
        # the identity by itself: it only records the candidate for this attempt.
        fingerprint = key.get_fingerprint("sha256")
        if not self._attempt(username, fingerprint):
            return False
        try:
            identity = await identify(self.gateway.store, fingerprint)
        except StoreUnavailable as exc:
            # The registry is down (a database restart): say so, rather than let the
            # client see "Connection closed"; its next attempt may work.
            self.failure = str(exc)
            self.failure_kind = "unavailable"
            raise asyncssh.ServiceNotAvailable(str(exc)) from None
        if identity is None:
            log.info(
                "event=auth_rejected conn=%s peer=%s reason=unknown_key fp=%s",
                self.id,
                self.peer,
                fingerprint,
            )
            self.failure = "unknown key"
            self.failure_kind = "unknown_key"
            algorithm = key.get_algorithm()
            self._banner(lambda told: told.lines_for_unknown_key(fingerprint, algorithm))
            return False
        if identity.expired(utcnow()):
            log.info(
                "event=auth_rejected conn=%s peer=%s reason=expired_key user=%s key=%s fp=%s",
                self.id,
                self.peer,
                identity.user_name,
                q(identity.key_name),
                fingerprint,
            )
            self.failure = "expired key"
            self.failure_kind = "expired_key"
            return self.proofs.ask_for_proof(Refusal(identity, "expired", identity.expires_at))
        self._candidate = identity
        return True

    async def _refusal_proven(self, refusal: Refusal) -> None:
        """The client signed with a key it may not log in with: it holds that key, so it
        may learn why, and the refusal is the account's to see in the audit trail."""
        identity = refusal.identity
        when = times.text(refusal.expires_at) if refusal.expires_at else "?"
        log.info(
            "event=auth_refused conn=%s peer=%s reason=%s user=%s key=%s fp=%s",
            self.id,
            self.peer,
            refusal.reason,
            identity.user_name,
            q(identity.key_name),
            identity.fingerprint,
        )
        await audit.record(
            self.gateway.store,
            "auth_refused",
            actor=identity.user_name,
            fingerprint=identity.fingerprint,
            source=self.peer,
            key=identity.key_name,
            reason=f"key {refusal.reason}",
        )
        self._banner(
            lambda _: [
                f'git-gateway: the SSH key "{identity.key_name}" of {identity.user_name} '
                f"({identity.fingerprint}) expired on {when}: it no longer logs in.",
                f"{self.gateway.explainer.where_keys_are_added()}.",
            ]
        )

    def _told(self) -> Told:
        if self.told is None:  # before connection_made: cannot happen, never fails
            self.told = Told(self.gateway.explainer, self.address)
        return self.told

    def _banner(self, lines: Callable[[Told], list[str]]) -> None:
        """Tell the client why an attempt failed (see explain.py), within the budget. An
        explanation is a courtesy: nothing in it may fail the authentication itself."""
        try:
            told = self._told()
            text = told.take(lines(told))
            if text and self.conn is not None:
                self.conn.send_auth_banner(terminal_safe(text))
        except Exception:
            log.exception("event=banner_failed conn=%s", self.id)

    # -- sessions: counted when their channel opens --

    def session_requested(self) -> SessionChannel:
        limit = self.gateway.config.limits.max_sessions_per_connection
        if self.identity is None:  # asyncssh opens no channel before auth; never trust it
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "not authenticated"
            )
        if sum(1 for channel in self.session_channels if channel.open) >= limit:
            self.channels_refused += 1
            self.gateway.metrics.limit_rejections.labels("max_sessions_per_connection").inc()
            if self.channels_refused == 1:  # once per connection: a flood is one line
                log.info(
                    "event=refused conn=%s user=%s reason=max_sessions_per_connection limit=%d",
                    self.id,
                    self.identity.user_name,
                    limit,
                )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"too many sessions on this connection (limit {limit})",
            )
        channel = SessionChannel(self)
        self.session_channels.add(channel)
        return channel

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
        self.gateway.admission.authenticated()
        self.gateway.metrics.auth.labels("ok").inc()
        self.conn.set_extra_info(gateway_identity=identity)
        cipher, mac = negotiated(self.conn)
        log.info(
            "event=auth_ok conn=%s peer=%s via=%s user=%s key=%s fp=%s cipher=%s mac=%s client=%s",
            self.id,
            self.peer,
            self.via,
            identity.user_name,
            q(identity.key_name),
            identity.fingerprint,
            cipher,
            mac,
            q(self.conn.get_extra_info("client_version")),
        )
        cert = identity.certificate
        if cert is None:
            await self.gateway.record_key_use(identity)
        detail: dict[str, object] = {"key": identity.key_name}
        if cert is not None:
            detail = {
                "certificate": cert.key_id,
                "serial": cert.serial,
                "principal": cert.principal,
                "ca": cert.ca_fingerprint,
            }
        await audit.record(
            self.gateway.store,
            "auth_ok",
            actor=identity.user_name,
            fingerprint=identity.fingerprint,
            source=self.peer,
            **detail,
        )


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
        self.repos = Repositories(config.storage.repos, config.git.max_input_size)
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
                self.web = WebServer(
                    cfg, registry, self.deploys, self.metrics, lambda: self.accepting
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
            log.info("event=listening listening on %s:%d", shown, addr_port)

    async def close(self, drain: float = 0.0) -> None:
        """Stop accepting, let running git operations and deploys finish for up to `drain`
        seconds, then close what is left."""
        if self.listener is not None:
            await self.listener.close()
        if drain > 0:
            await self._drain(drain)
        for connection in list(self.connections):
            if connection.conn is not None:
                connection.conn.close()
        await self.deploys.close()
        await webhook.close()
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

    async def _drain(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        self.deploys.draining.set()  # watchers that stopped reading must not hold us up
        busy = [c for c in self.connections if c.sessions > 0]
        waits: set[asyncio.Future[Any]] = set(self.sessions)
        waits |= {job.done for job in self.deploys.jobs.values() if job.task is not None}
        if not waits:
            return
        log.info(
            "event=draining sessions=%d deploys=%d timeout=%s",
            len(self.sessions),
            len(waits) - len(self.sessions),
            seconds,
        )
        _, pending = await asyncio.wait(waits, timeout=seconds)
        if pending:
            log.warning("event=drain_timeout left=%d", len(pending))
            return
        # A finished session's last bytes may still be on their way: let those clients close
        # their connections themselves rather than cut them; one that reads nothing any more
        # (a stalled watcher) is not waited for beyond CLOSE_GRACE.
        closing = {asyncio.ensure_future(c.closed.wait()) for c in busy if not c.closed.is_set()}
        if closing:
            grace = min(deadline - loop.time(), CLOSE_GRACE_SECONDS)
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

    @property
    def accepting(self) -> bool:
        return self.listener is not None and self.listener.accepting

    def reload(self) -> None:
        """SIGHUP: re-read the config file in the background (see `_reload`)."""
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
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await stop.wait()
            log.info("event=stopping drain_timeout=%s", self.config.limits.drain_timeout)
        finally:
            for sig in (*stop_signals, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.close(drain=self.config.limits.drain_timeout)
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
        task = asyncio.current_task()
        if task is not None:
            self.sessions.add(task)
        connection.sessions += 1
        connection.sessions_total += 1
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
        )
        return await execute(ctx, invocation)
