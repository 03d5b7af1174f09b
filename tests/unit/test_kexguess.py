"""Reading a client's key exchange guess from its KEXINIT (see gateway/ssh/kexguess.py)."""

from __future__ import annotations

import pytest
from asyncssh.packet import Boolean, NameList, PacketDecodeError, UInt32

from gateway.ssh.kexguess import kexinit_guess


def kexinit(kex: list[bytes], host_keys: list[bytes], follows: bool) -> bytes:
    """A KEXINIT payload after its message type byte, as RFC 4253 section 7.1 lays it out."""
    others = [NameList([b"aes128-ctr"])] * 2 + [NameList([b"hmac-sha2-256"])] * 2
    others += [NameList([b"none"])] * 2 + [NameList([])] * 2
    return (
        bytes(16)
        + NameList(kex)
        + NameList(host_keys)
        + b"".join(others)
        + Boolean(follows)
        + UInt32(0)
    )


def test_first_algorithms_and_the_guess_flag():
    payload = kexinit([b"curve25519-sha256", b"ecdh-sha2-nistp256"], [b"ssh-ed25519"], True)
    assert kexinit_guess(payload) == (b"curve25519-sha256", b"ssh-ed25519", True)
    assert kexinit_guess(kexinit([b"a"], [b"b"], False))[2] is False


def test_empty_lists_name_nothing():
    assert kexinit_guess(kexinit([], [], True)) == (b"", b"", True)


@pytest.mark.parametrize("cut", [0, 10, 20, 60])
def test_truncated_payloads_are_decode_errors(cut):
    payload = kexinit([b"curve25519-sha256"], [b"ssh-ed25519"], True)
    with pytest.raises(PacketDecodeError):
        kexinit_guess(payload[:cut])
