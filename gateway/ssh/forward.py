"""A git operation forwarded to its repository's home node: the request both ends agree on,
and the entry node's side (one SSH connection per peer, a channel per operation, the user's
streams and git's exit status pumped through it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncssh

from ..errors import GatewayError
from ..git.bridge import CHUNK, CLIENT_GONE, Channel, Outcome, Reader, Writer
from ..logs import q
from ..models import CertInfo, Identity
from ..names import app_name

log = logging.getLogger("gateway.forward")

# The exit status of a forwarded operation the home node did not run because it is not (or
# no longer) the app's home: the entry node looks again. git never exits with it (its own
# errors are 128 and 129, and 128 + a signal's number).
NOT_HOME = 254
# The user name nodes log in to each other with (the key, the nodes' shared host key, is
# what is checked).
PEER_USER = "git-gateway-node"
CONNECT_TIMEOUT = 5.0
# Above this, a request is not one of ours.
MAX_REQUEST = 16 * 1024
# What the logs read: a connection id, a client's address, a node's name.
CONN = re.compile(r"[A-Za-z0-9._-]{1,64}")
PEER = re.compile(r"[0-9A-Fa-f.:\[\]%-]{1,64}|-")
NODE = re.compile(r"[A-Za-z0-9._-]{1,255}")
# The home's first byte on stdout: it serves the operation (git's own bytes follow). Before
# it, nothing of the client's input is sent, so that a home that answers NOT_HOME instead
# leaves that input to the next one.
SERVING = b"\x01"
# After a connection to a peer failed, operations fail at once for this long rather than
# each waiting for its own connection attempt.
RETRY_AFTER = 2.0
# A home that has not said within this long whether it serves is treated as gone.
DECIDE_TIMEOUT = 30.0


class BadRequest(GatewayError):
    """What a peer sent is not a forwarded operation."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One forwarded git operation: what the entry node checked, for the home to run."""

    service: str  # git-upload-pack, git-receive-pack, git-upload-archive
    app: str
    identity: Identity
    protocol: str | None  # the client's GIT_PROTOCOL
    conn: str  # the entry node's connection id, for the logs of both
    peer: str  # the client's address
    via: str  # the entry node's name

    def encode(self) -> str:
        ident = dataclasses.asdict(self.identity)
        if self.identity.expires_at is not None:
            ident["expires_at"] = self.identity.expires_at.isoformat()
        body = {**dataclasses.asdict(self), "identity": ident}
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, text: str | None) -> Request:
        """Parse and check a request (from an authenticated peer, but checked all the same:
        it names a repository path and a user)."""
        if not text or len(text) > MAX_REQUEST:
            raise BadRequest("not a forwarded operation")
        try:
            body = json.loads(text)
            ident = body["identity"]
            identity = Identity(
                user_id=_optional(ident["user_id"], int),
                user_name=_text(ident["user_name"]),
                key_id=_int(ident["key_id"]),
                key_name=_text(ident["key_name"]),
                fingerprint=_text(ident["fingerprint"]),
                expires_at=_time(ident["expires_at"]),
                app_id=_optional(ident["app_id"], int),
                app_name=_optional(ident["app_name"], str),
                access=_optional(ident["access"], str),
                scope=None if ident["scope"] is None else tuple(map(_text, ident["scope"])),
                certificate=None if ident["certificate"] is None else _cert(ident["certificate"]),
            )
            request = cls(
                service=_text(body["service"]),
                app=app_name(_text(body["app"])),
                identity=identity,
                protocol=_optional(body["protocol"], str),
                conn=_matching(body["conn"], CONN),
                peer=_matching(body["peer"], PEER),
                via=_matching(body["via"], NODE),
            )
        except (KeyError, TypeError, ValueError, GatewayError, AttributeError) as exc:
            raise BadRequest(f"not a forwarded operation ({exc.__class__.__name__})") from None
        return request


def _text(value: Any) -> str:
    """A string without control characters (they would forge log lines or reach git's
    environment)."""
    if not isinstance(value, str):
        raise TypeError("expected a string")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("control character")
    return value


def _matching(value: Any, pattern: re.Pattern[str]) -> str:
    text = _text(value)
    if not pattern.fullmatch(text):
        raise ValueError("unexpected form")
    return text


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected a number")
    return value


def _optional(value: Any, kind: type) -> Any:
    if value is None:
        return None
    return _int(value) if kind is int else _text(value)


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(_text(value))


def _cert(value: Any) -> CertInfo:
    return CertInfo(
        key_id=_text(value["key_id"]),
        serial=_int(value["serial"]),
        ca_fingerprint=_text(value["ca_fingerprint"]),
        key_fingerprint=_text(value["key_fingerprint"]),
        valid_before=float(value["valid_before"]),
        principal=_text(value["principal"]),
    )


class PeerUnreachable(Exception):
    """The home node did not take the operation (no connection, or none any more)."""


class Forwarder:
    """The entry node's connections to the other nodes: one per address, made on first use
    and again after it breaks; each operation is a channel of its own on it."""

    def __init__(
        self,
        keys: Sequence[asyncssh.SSHKey],
        kex: Sequence[str],
        ciphers: Sequence[str],
        macs: Sequence[str],
        window: int,
        max_packet: int,
    ) -> None:
        # Both ends prove they hold the nodes' shared host key: the client signs with it,
        # and the server must present it.
        self.options = asyncssh.SSHClientConnectionOptions(
            username=PEER_USER,
            client_keys=list(keys),
            known_hosts=([k.convert_to_public() for k in keys], [], []),
            kex_algs=list(kex),
            encryption_algs=list(ciphers),
            mac_algs=list(macs),
            compression_algs=["none"],
            encoding=None,
            agent_path=None,
            # A peer that stops answering is found out within half a minute.
            keepalive_interval=10,
            keepalive_count_max=3,
            window=window,
            max_pktsize=max_packet,
            gss_host=None,
            password_auth=False,
            kbdint_auth=False,
        )
        self._connections: dict[str, asyncssh.SSHClientConnection] = {}
        # One connection attempt per address at a time, shared by every operation waiting.
        self._connecting: dict[str, asyncio.Future[asyncssh.SSHClientConnection]] = {}
        self._failed: dict[str, float] = {}

    async def _connection(self, address: str) -> asyncssh.SSHClientConnection:
        conn = self._connections.get(address)
        if conn is not None and not conn.is_closed():
            return conn
        self._connections.pop(address, None)
        failed = self._failed.get(address)
        if failed is not None and time.monotonic() - failed < RETRY_AFTER:
            raise PeerUnreachable(address)
        attempt = self._connecting.get(address)
        if attempt is None:
            attempt = asyncio.ensure_future(self._connect(address))
            self._connecting[address] = attempt
            attempt.add_done_callback(lambda _: self._connecting.pop(address, None))
        # Shielded: one waiter cancelled (its client left) leaves the attempt to the others.
        return await asyncio.shield(attempt)

    async def _connect(self, address: str) -> asyncssh.SSHClientConnection:
        host, _, port = address.rpartition(":")
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(host.strip("[]"), int(port), options=self.options),
                CONNECT_TIMEOUT,
            )
        except (OSError, asyncssh.Error, TimeoutError, ValueError) as exc:
            self._failed[address] = time.monotonic()
            log.warning("event=peer_unreachable address=%s error=%s", address, q(exc))
            raise PeerUnreachable(address) from None
        self._failed.pop(address, None)
        # Addresses change with restarts (a port 0): a closed connection leaves no entry.
        for old in [a for a, c in self._connections.items() if c.is_closed()]:
            del self._connections[old]
        self._connections[address] = conn
        return conn

    async def run(self, address: str, request: Request, channel: Channel) -> Outcome:
        """Run `request` on the node at `address`, with the user's streams; its outcome
        (returncode NOT_HOME: that node did not run it, and none of the user's input was
        used). PeerUnreachable if no channel opens."""
        conn = await self._connection(address)
        try:
            process = await conn.create_process(request.encode(), encoding=None)
        except (OSError, asyncssh.Error) as exc:
            # A connection that broke since its last use: one fresh try.
            log.info("event=peer_channel_failed address=%s error=%s", address, q(exc))
            conn.close()
            conn = await self._connection(address)
            try:
                process = await conn.create_process(request.encode(), encoding=None)
            except (OSError, asyncssh.Error) as again:
                log.warning("event=peer_unreachable address=%s error=%s", address, q(again))
                raise PeerUnreachable(address) from None
        try:
            # The home answers once it has checked the rights and the home (registry reads).
            first = await asyncio.wait_for(process.stdout.read(len(SERVING)), DECIDE_TIMEOUT)
        except (*CLIENT_GONE, TimeoutError):
            first = b""
        if first != SERVING:
            # Not served: refused there (its one error line goes to the user), or not the
            # home (NOT_HOME, nothing said), or the home gone.
            return await _refused(process, channel)
        return await _pump(process, channel)

    async def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        for conn in self._connections.values():
            with contextlib.suppress(Exception):
                await conn.wait_closed()
        self._connections.clear()


async def _refused(process: asyncssh.SSHClientProcess[bytes], channel: Channel) -> Outcome:
    """What the home said instead of serving, passed on; its exit status (or -1: gone)."""
    with contextlib.suppress(*CLIENT_GONE, TimeoutError):
        async with asyncio.timeout(CONNECT_TIMEOUT):
            while said := await process.stderr.read(MAX_REQUEST):
                channel.stderr.write(said)
                await channel.stderr.drain()
    with contextlib.suppress(*CLIENT_GONE, TimeoutError):
        await asyncio.wait_for(process.wait_closed(), CONNECT_TIMEOUT)
    process.close()
    status = process.exit_status
    return Outcome(status if status is not None else -1, False, 0, 0)


async def _pump(process: asyncssh.SSHClientProcess[bytes], channel: Channel) -> Outcome:
    """The user's stdin to the home's git, its stdout and stderr back, until it exits. The
    user going away closes the channel: the home's git then ends as it would for a client
    gone (a push is left to finish there)."""
    counts = {"in": 0, "out": 0}
    gone = asyncio.Event()

    async def upstream() -> None:
        while True:
            try:
                data = await channel.stdin.read(CHUNK)
            except CLIENT_GONE:
                gone.set()
                return
            try:
                if not data:
                    process.stdin.write_eof()
                    return
                counts["in"] += len(data)
                process.stdin.write(data)
                await process.stdin.drain()
            except CLIENT_GONE:
                return  # the home's side broke: its exit status (none) will say

    async def downstream(reader: Reader, writer: Writer, count: bool) -> None:
        forwarding = True
        while True:
            try:
                data = await reader.read(CHUNK)
            except CLIENT_GONE:
                return  # the home node's connection broke: the exit status will say
            if not data:
                return
            if not forwarding:
                continue
            try:
                writer.write(data)
                await writer.drain()
                if count:
                    counts["out"] += len(data)
            except CLIENT_GONE:
                forwarding = False
                gone.set()

    feeder = asyncio.create_task(upstream())
    pumps: asyncio.Future[Any] = asyncio.gather(
        downstream(process.stdout, channel.stdout, True),
        downstream(process.stderr, channel.stderr, False),
    )
    lost: asyncio.Future[Any] = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({pumps, lost}, return_when=asyncio.FIRST_COMPLETED)
        if gone.is_set():
            process.close()
        with contextlib.suppress(*CLIENT_GONE):
            await pumps
        await process.wait_closed()
    finally:
        lost.cancel()
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, *CLIENT_GONE):
            await feeder
        if not pumps.done():
            pumps.cancel()
            with contextlib.suppress(BaseException):
                await pumps
        process.close()
    status = process.exit_status
    # No exit status: the channel closed first (the home node died or the user left).
    code = status if status is not None else -1
    return Outcome(code, gone.is_set(), counts["in"], counts["out"])
