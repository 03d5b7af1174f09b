"""Key exchange guesses judged as RFC 4253 says, so that Dropbear's dbclient can connect."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import asyncssh
from asyncssh.constants import MSG_KEXINIT
from asyncssh.packet import PacketDecodeError, SSHPacket

log = logging.getLogger("gateway.kexguess")

# After the cookie and the key exchange and host key lists: ciphers, MACs and compression
# (each way) and languages (each way).
_OTHER_LISTS = 8


def kexinit_guess(payload: bytes) -> tuple[bytes, bytes, bool]:
    """The first key exchange and host key algorithms a KEXINIT payload (after its message
    type) names, and whether it says a guessed key exchange packet follows."""
    packet = SSHPacket(payload)
    packet.get_bytes(16)  # cookie
    kex = packet.get_namelist()
    host_keys = packet.get_namelist()
    for _ in range(_OTHER_LISTS):
        packet.get_namelist()
    follows = packet.get_boolean()
    return (kex[0] if kex else b""), (host_keys[0] if host_keys else b""), follows


def judge_guesses_by_rfc(conn: asyncssh.SSHServerConnection, kex: str, host_key: str) -> None:
    """Make this connection ignore a client's guessed key exchange packet exactly when
    RFC 4253 (7.1) says the guess is wrong: when the first key exchange or host key
    algorithm of the client's list differs from the first of ours (`kex`, `host_key`).

    Dropbear's client sends such a guess and follows that rule: with our list starting
    with mlkem768x25519-sha256 and its with curve25519-sha256, it deems its guess wrong
    and sends the packet again. asyncssh (2.24) only checks that the algorithm chosen is
    the client's first, so it uses the guess, then takes the second packet for a protocol
    error ("Key exchange not in progress"). OpenSSH's sshd applies the RFC's rule.

    This replaces asyncssh's KEXINIT handler for this connection only, around the original;
    without the internals it relies on, it logs once per connection and changes nothing.
    """
    found = getattr(type(conn), "_packet_handlers", None)
    handlers: Mapping[int, Any] = found if isinstance(found, Mapping) else {}
    process = handlers.get(MSG_KEXINIT)
    if process is None or not hasattr(conn, "_ignore_first_kex"):
        log.warning("event=kex_guess_rule_unavailable asyncssh=%s", asyncssh.__version__)
        return
    ours = (kex.encode(), host_key.encode())

    def process_kexinit(self: Any, pkttype: int, pktid: int, packet: SSHPacket) -> Any:
        try:
            guess = kexinit_guess(packet.get_remaining_payload())
        except PacketDecodeError:
            guess = None  # malformed: asyncssh's own handler rejects it
        result = process(self, pkttype, pktid, packet)
        if guess is None or not guess[2]:
            return result

        def judge() -> None:
            self._ignore_first_kex = guess[:2] != ours

        if not inspect.isawaitable(result):
            judge()
            return result

        # asyncssh's handler is a coroutine that sets its own verdict; it runs to its end
        # before the next packet is read, so the RFC's verdict replaces it in time.
        async def process_then_judge() -> None:
            await result
            judge()

        return process_then_judge()

    conn._packet_handlers = {**handlers, MSG_KEXINIT: process_kexinit}  # type: ignore[attr-defined]
