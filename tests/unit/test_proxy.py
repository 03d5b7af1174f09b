"""PROXY protocol parsing on real sockets: the header is consumed, the SSH bytes are not."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from gateway.net import proxy

SSH = b"SSH-2.0-OpenSSH_9.2\r\n"


async def parse(data: bytes, required: bool = True) -> tuple[proxy.ProxiedAddress | None, bytes]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        header = await asyncio.wait_for(proxy.read_header(ours, required), 5)
        rest = b""
        while chunk := await asyncio.get_running_loop().sock_recv(ours, 4096):
            rest += chunk
        return header, rest
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (proxy.v1_header(("203.0.113.7", 51000), ("10.0.0.1", 22)), ("203.0.113.7", 51000)),
        (proxy.v1_header(("2001:db8::7", 443), ("2001:db8::1", 22)), ("2001:db8::7", 443)),
        (proxy.v2_header(("198.51.100.9", 40000)), ("198.51.100.9", 40000)),
        (proxy.v2_header(("2001:db8::9", 1)), ("2001:db8::9", 1)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
        (proxy.v2_header(None), None),
    ],
)
async def test_headers_are_parsed_and_the_stream_kept(
    header: bytes, client: tuple[str, int] | None
) -> None:
    parsed, rest = await parse(header + SSH)
    assert parsed is not None and parsed.client == client
    assert rest == SSH


async def test_v2_tlvs_are_skipped() -> None:
    base = proxy.v2_header(("192.0.2.1", 5))
    tlv = bytes([0x04, 0x00, 0x03]) + b"abc"  # PP2_TYPE_NOOP
    length = int.from_bytes(base[14:16], "big") + len(tlv)
    header = base[:14] + length.to_bytes(2, "big") + base[16:] + tlv
    parsed, rest = await parse(header + SSH)
    assert parsed is not None and parsed.client == ("192.0.2.1", 5)
    assert rest == SSH


async def test_optional_without_header_leaves_everything() -> None:
    parsed, rest = await parse(SSH, required=False)
    assert parsed is None and rest == SSH


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (SSH, "missing"),
        (b"", "truncated"),
        (b"PROXY TCP4 1.2.3.4\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 22\r\n", "malformed"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 22\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 22\r\n", "malformed"),
        (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 22", "truncated"),
        (b"PROXX TCP4 1.2.3.4 5.6.7.8 1 22\r\n", "malformed"),
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12), "malformed"),
        (proxy.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "malformed"),
        (proxy.V2_SIGNATURE + b"\x21\x11\xff\xff", "malformed"),
        (proxy.V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(4), "truncated"),
    ],
)
async def test_bad_headers_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(proxy.ProxyHeaderError) as err:
        await parse(data)
    assert err.value.reason == reason


def test_trusted_matches_networks_and_mapped_addresses() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert proxy.trusted("10.1.2.3", nets)
    assert proxy.trusted("::ffff:10.1.2.3", nets)
    assert proxy.trusted("::1", nets)
    assert not proxy.trusted("127.0.0.1", nets)
    assert not proxy.trusted("not-an-ip", nets)
