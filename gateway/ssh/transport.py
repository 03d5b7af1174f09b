"""Per-connection tweaks under asyncssh: env requests declined at the SSH layer, TCP quick
acks during the handshake, and the negotiated cipher and MAC for the operator's log."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

import asyncssh

log = logging.getLogger("gateway.server")

MAX_GIT_PROTOCOL = 256


def decline_env_requests(conn: asyncssh.SSHServerConnection) -> None:
    """Make this connection's session channels accept only a GIT_PROTOCOL env request.

    asyncssh stores every env request a client sends, without limit; declining the others
    at the SSH layer keeps them out of memory as well as away from git. It relies on
    asyncssh's channel request dispatch (`_process_<name>_request`), checked at install
    time; without it, the variables are still ignored when git is spawned.
    """
    create = conn.create_server_channel

    def create_filtered(*args: Any, **kwargs: Any) -> asyncssh.SSHServerChannel[Any]:
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

        channel._process_env_request = env_request  # type: ignore[method-assign]
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
