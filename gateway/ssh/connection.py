"""One SSH client connection (asyncssh glue): key and certificate authentication bound to
the signature that completed it, refusals explained, session channels counted."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import asyncssh
from asyncssh.packet import String

from .. import executors, times
from ..config import Config
from ..domain.facade import Domain
from ..errors import NotFound, StoreUnavailable
from ..logs import q
from ..metrics import Metrics
from ..models import CertInfo, Identity
from ..names import USER_NAME
from ..textsafe import terminal_safe
from . import certs, kexguess
from .explain import Explainer, Told
from .limits import CONNECTIONS, Admission, user_key
from .possession import Proofs, Refusal, Verify
from .transport import decline_env_requests, negotiated, quick_acks


class Host(Protocol):
    """What a connection needs from the server that accepted it (the app implements it; the
    SSH layer never imports the app)."""

    domain: Domain
    metrics: Metrics
    admission: Admission
    explainer: Explainer
    connections: set[Connection]
    cert_cas: certs.TrustedCAs
    revocations: certs.Revocations
    first_algorithms: tuple[str, str]

    @property
    def config(self) -> Config: ...  # the running configuration, read at use
    async def handle_process(self, process: asyncssh.SSHServerProcess[Any]) -> None: ...
    def refresh_certificate_lists(self) -> None: ...


# The logger of the connection events before they left server.py: operators filter on it.
log = logging.getLogger("gateway.server")

NO_AUTH = "client disconnected before authenticating"


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
    """One client connection: authentication state and the identity it ends with.

    Size: asyncssh's callbacks for one connection's authentication, one state machine; split,
    the rule that binds the identity to the key that completed auth would be spread out."""

    def __init__(
        self,
        gateway: Host,
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
        # Counted against [limits] max_connections_per_user once authenticated (its key), or
        # over that limit: why every session it opens is refused.
        self.user_held: str | None = None
        self.over_limit: str | None = None

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
        if self.user_held is not None:
            self.gateway.admission.give_back(CONNECTIONS, self.user_held)
            self.user_held = None
        if self.identity is None:
            if self.auth_attempts:
                self.gateway.explainer.login_failed(self.address)
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
            # Counted in memory per source and minute; written by the housekeeping task.
            self.gateway.domain.access.login_failed(
                self.address,
                self.failure_kind,
                self.failure,
                fingerprint=self.last_fingerprint if self.auth_attempts else "",
                attempts=self.auth_attempts,
            )
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
                user = await self.gateway.domain.accounts.get_user(name)
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
            identity = await self.gateway.domain.access.identify(fingerprint)
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
        if identity.expired(times.now()):
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
        await self.gateway.domain.access.login_refused(identity, self.peer, refusal.reason)
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

    def _hold_user_slot(self, identity: Identity) -> None:
        """Count this connection against its user's [limits] max_connections_per_user, or
        refuse it: told on every session it opens (authenticated, it can be told in a line
        of its own, which a login refusal could not), closed soon whatever it does."""
        limit = self.gateway.config.limits.max_connections_per_user
        key = user_key(identity)
        if self.gateway.admission.hold(CONNECTIONS, key, limit):
            self.user_held = key
            return
        self.over_limit = (
            f"too many connections for {identity.user_name} (at most {limit} at once on this "
            "node; [limits] max_connections_per_user)"
        )
        self.outcome = "refused"
        self.gateway.metrics.limit_rejections.labels("max_connections_per_user").inc()
        log.warning(
            "event=connection_refused conn=%s peer=%s user=%s reason=max_connections_per_user "
            "limit=%d",
            self.id,
            self.peer,
            identity.user_name,
            limit,
        )
        if self.conn is not None:
            timeout = self.gateway.config.limits.channel_request_timeout
            asyncio.get_running_loop().call_later(timeout, self.conn.close)

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
        if self.told is not None:
            self.gateway.explainer.logged_in_after(self.address, self.told.unknown)
        self.gateway.admission.authenticated()
        self._hold_user_slot(identity)
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
        access = self.gateway.domain.access
        if identity.certificate is None:
            await access.record_key_use(identity)
        await access.logged_in(identity, self.peer)
