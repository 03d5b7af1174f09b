"""A git operation forwarded to its repository's home node: the request both ends agree on,
and the entry node's side (one SSH connection per peer, a channel per operation, the user's
streams and git's exit status pumped through it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
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
                conn=_text(body["conn"]),
                peer=_text(body["peer"]),
                via=_text(body["via"]),
            )
        except (KeyError, TypeError, ValueError, GatewayError, AttributeError) as exc:
            raise BadRequest(f"not a forwarded operation ({exc.__class__.__name__})") from None
        return request


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


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
        self._locks: dict[str, asyncio.Lock] = {}

    async def _connection(self, address: str) -> asyncssh.SSHClientConnection:
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            conn = self._connections.get(address)
            if conn is not None and not conn.is_closed():
                return conn
            host, _, port = address.rpartition(":")
            try:
                conn = await asyncio.wait_for(
                    asyncssh.connect(host.strip("[]"), int(port), options=self.options),
                    CONNECT_TIMEOUT,
                )
            except (OSError, asyncssh.Error, TimeoutError, ValueError) as exc:
                log.warning("event=peer_unreachable address=%s error=%s", address, q(exc))
                raise PeerUnreachable(address) from None
            self._connections[address] = conn
            return conn

    async def run(self, address: str, request: Request, channel: Channel) -> Outcome:
        """Run `request` on the node at `address`, with the user's streams; its outcome
        (returncode NOT_HOME: that node did not run it). PeerUnreachable if no channel opens."""
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
        return await _pump(process, channel)

    async def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        for conn in self._connections.values():
            with contextlib.suppress(Exception):
                await conn.wait_closed()
        self._connections.clear()


async def _pump(process: asyncssh.SSHClientProcess[bytes], channel: Channel) -> Outcome:
    """The user's stdin to the home's git, its stdout and stderr back, until it exits. The
    user going away closes the channel: the home's git then ends as it would for a client
    gone (a push is left to finish there)."""
    counts = {"in": 0, "out": 0}
    gone = asyncio.Event()

    async def upstream() -> None:
        try:
            while True:
                data = await channel.stdin.read(CHUNK)
                if not data:
                    break
                counts["in"] += len(data)
                process.stdin.write(data)
                await process.stdin.drain()
            process.stdin.write_eof()
        except CLIENT_GONE:
            gone.set()

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
