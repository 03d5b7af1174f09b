"""PROXY protocol v1 and v2 (HAProxy's spec): read the header a TCP balancer sends first.

The header is read with exact-size reads straight from the accepted socket, so not one byte
of the SSH stream that follows is consumed: the socket is then handed to the SSH server as
if the client had connected directly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_MAX_BODY = 4096  # addresses plus TLVs; balancers send well under this


class ProxyHeaderError(Exception):
    """A missing, malformed or truncated header; `reason` is a metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxiedAddress:
    """The original client, or None for a LOCAL/UNKNOWN header (a balancer's health check)."""

    client: tuple[str, int] | None
    version: int


def trusted(address: str, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allowed)


async def _exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise ProxyHeaderError("truncated", "connection closed inside the PROXY header")
        data += chunk
    return data


async def _first_byte(sock: socket.socket) -> bytes:
    """Wait until the client has sent something and peek at its first byte."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:  # a spurious wake-up: try again
        return await _first_byte(sock)


async def read_header(sock: socket.socket, required: bool) -> ProxiedAddress | None:
    """Read a PROXY header if the stream starts with one; None if it does not and the
    header is optional. Raises ProxyHeaderError otherwise. The caller bounds the time."""
    first = await _first_byte(sock)
    if not first:
        raise ProxyHeaderError("truncated", "connection closed before any data")
    if first == b"P":
        return _parse_v1(await _read_v1(sock))
    if first == V2_SIGNATURE[:1]:
        head = await _exactly(sock, 16)
        if head[:12] != V2_SIGNATURE:
            raise ProxyHeaderError("malformed", "bad v2 signature")
        (length,) = struct.unpack("!H", head[14:16])
        if length > V2_MAX_BODY:
            raise ProxyHeaderError("malformed", f"v2 header body of {length} bytes")
        return _parse_v2(head, await _exactly(sock, length))
    if required:
        raise ProxyHeaderError("missing", "the stream does not start with a PROXY header")
    return None


async def _read_v1(sock: socket.socket) -> bytes:
    # Byte by byte: the line's length is only known at its CRLF, and reading further would
    # eat the client's SSH version string.
    line = await _exactly(sock, len(V1_PREFIX))
    if line != V1_PREFIX:
        raise ProxyHeaderError("malformed", "bad v1 prefix")
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyHeaderError("malformed", "v1 line longer than 107 bytes")
        line += await _exactly(sock, 1)
    return line


def _parse_v1(line: bytes) -> ProxiedAddress:
    try:
        parts = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("malformed", "v1 line is not ASCII") from None
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxiedAddress(None, 1)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed", f"v1 line {line[:60]!r}")
    _, family, source, _dest, source_port, _dest_port = parts
    try:
        ip = ipaddress.ip_address(source)
        port = int(source_port)
    except ValueError:
        raise ProxyHeaderError("malformed", f"v1 address {source!r} port {source_port!r}") from None
    if (
        (ip.version == 4) != (family == "TCP4")
        or not 0 <= port <= 65535
        or source_port != str(port)
    ):
        raise ProxyHeaderError("malformed", f"v1 address {source!r} port {source_port!r}")
    return ProxiedAddress((str(ip), port), 1)


def _parse_v2(head: bytes, body: bytes) -> ProxiedAddress:
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError("malformed", f"v2 version nibble {version}")
    if command == 0x0:  # LOCAL: the balancer's own connection (health checks)
        return ProxiedAddress(None, 2)
    if command != 0x1:
        raise ProxyHeaderError("malformed", f"v2 command {command}")
    family = head[13]
    if family == 0x11 and len(body) >= 12:  # TCP over IPv4
        source = ipaddress.IPv4Address(body[0:4])
        (port,) = struct.unpack("!H", body[8:10])
        return ProxiedAddress((str(source), port), 2)
    if family == 0x21 and len(body) >= 36:  # TCP over IPv6
        source6 = ipaddress.IPv6Address(body[0:16])
        (port,) = struct.unpack("!H", body[32:34])
        return ProxiedAddress((str(source6), port), 2)
    if family == 0x00:  # UNSPEC: no address to report
        return ProxiedAddress(None, 2)
    raise ProxyHeaderError("malformed", f"v2 family 0x{family:02x} with {len(body)} bytes")


def v1_header(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """A v1 header (for tests, the benchmark and example balancers)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n".encode()


def v2_header(source: tuple[str, int] | None, dest: tuple[str, int] | None = None) -> bytes:
    """A v2 header; source None makes a LOCAL one."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if dest is None:
        dest = ("::", 0) if ":" in source[0] else ("0.0.0.0", 0)  # noqa: S104 (not a bind)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], dest[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
