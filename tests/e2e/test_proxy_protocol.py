"""PROXY protocol on the SSH listener, with real headers sent ahead of real ssh/git clients."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.net import proxy
from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    GatewayFactory,
    GatewayHandle,
    ServerThread,
    banner,
    http,
    http_base,
    keygen,
    unique,
)


class Balancer:
    """A TCP relay that, like HAProxy with send-proxy, opens each upstream connection with
    a PROXY header naming a client address of the test's choosing."""

    def __init__(self, upstream_port: int, header: Callable[[], bytes]) -> None:
        self.upstream_port = upstream_port
        self.header = header
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), TIMEOUT)
            upstream.sendall(self.header())
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@dataclass
class Via:
    """What Client needs of a server, but reached through the balancer."""

    server: ServerThread
    port: int

    def known_hosts(self, path: Path) -> Path:
        path = self.server.known_hosts(path)
        text = path.read_text().replace(f"]:{self.server.port} ", f"]:{self.port} ")
        path.write_text(text)
        return path


@pytest.fixture
def required(gateway_factory: GatewayFactory) -> GatewayHandle:
    return gateway_factory(
        ssh={
            "proxy_protocol": "required",
            "proxy_allowed": ["127.0.0.1/32"],
            "proxy_header_timeout": 1,
        }
    )


def user_with_app(server: ServerThread, tmp_path: Path) -> tuple[str, Path, str]:
    admin = Admin(server.config_path)
    user, app = unique("px"), unique("pxapp")
    key = keygen(tmp_path / unique("key"))
    admin.ok("user", "add", user)
    admin.ok("key", "add", user, "laptop", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", user)
    return user, key, app


def refused(sock: socket.socket) -> bool:
    """The server closed the connection without its SSH banner (a reset counts: it closed
    with the client's bytes unread)."""
    try:
        return banner(sock) == b""
    except ConnectionResetError:
        return True


def rejections(server: ServerThread, reason: str) -> float:
    text = http("GET", http_base(server) + "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith("gateway_proxy_protocol_rejections_total{") and f'"{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("version", [1, 2])
def test_client_address_comes_from_the_header(
    required: ServerThread, tmp_path: Path, version: int
) -> None:
    user, key, app = user_with_app(required, tmp_path)
    client_addr = ("203.0.113.7", 41000) if version == 1 else ("2001:db8::7", 41000)

    def header() -> bytes:
        if version == 1:
            return proxy.v1_header(client_addr, ("127.0.0.1", required.port))
        return proxy.v2_header(client_addr)

    balancer = Balancer(required.port, header)
    try:
        via = Via(required, balancer.port)
        client = Client(tmp_path / "home", key, via, name=user)  # type: ignore[arg-type]
        repo = client.new_repo(tmp_path / "work")
        client.git("push", "-q", client.url(app), "main", cwd=repo, check=True)
    finally:
        balancer.close()
    events = json.loads(Admin(required.config_path).ok("audit", "--user", user, "--json"))
    shown = f"[{client_addr[0]}]:41000" if ":" in client_addr[0] else f"{client_addr[0]}:41000"
    sources = {e["source"] for e in events if e["event"] in ("auth_ok", "push")}
    assert sources == {shown}


def test_required_refuses_a_connection_without_header(required: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", required.port), TIMEOUT) as sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        assert refused(sock)
    required.wait_until(lambda: not required.gateway.listener._handshakes)
    assert rejections(required, "missing") == 1


def test_required_refuses_a_silent_connection_after_the_timeout(required: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", required.port), TIMEOUT) as sock:
        assert refused(sock)  # closed by the server after proxy_header_timeout
    assert rejections(required, "timeout") == 1


def test_malformed_header_is_refused(required: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", required.port), TIMEOUT) as sock:
        sock.sendall(b"PROXY TCP4 999.1.1.1 127.0.0.1 1 22\r\nSSH-2.0-x\r\n")
        assert refused(sock)
    required.wait_until(lambda: not required.gateway.listener._handshakes)
    assert rejections(required, "malformed") == 1


def test_untrusted_peer_is_refused_when_required(gateway_factory, tmp_path: Path) -> None:
    server = gateway_factory(ssh={"proxy_protocol": "required", "proxy_allowed": ["10.0.0.0/8"]})
    with socket.create_connection(("127.0.0.1", server.port), TIMEOUT) as sock:
        sock.sendall(proxy.v1_header(("203.0.113.1", 1), ("127.0.0.1", 22)))
        assert refused(sock)
    assert rejections(server, "untrusted") == 1


def test_optional_serves_direct_and_proxied_clients(gateway_factory, tmp_path: Path) -> None:
    server = gateway_factory(ssh={"proxy_protocol": "optional", "proxy_allowed": ["127.0.0.1/32"]})
    with socket.create_connection(("127.0.0.1", server.port), TIMEOUT) as sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        assert banner(sock).startswith(b"SSH-2.0-git-gateway")
    with socket.create_connection(("127.0.0.1", server.port), TIMEOUT) as sock:
        sock.sendall(proxy.v2_header(("192.0.2.50", 999)) + b"SSH-2.0-OpenSSH_9.2\r\n")
        assert banner(sock).startswith(b"SSH-2.0-git-gateway")
        server.wait_until(
            lambda: any(c.address == "192.0.2.50" for c in server.gateway.connections)
        )


def test_untrusted_header_is_not_believed_when_optional(gateway_factory, tmp_path: Path) -> None:
    server = gateway_factory(ssh={"proxy_protocol": "optional", "proxy_allowed": ["10.0.0.0/8"]})
    with socket.create_connection(("127.0.0.1", server.port), TIMEOUT) as sock:
        # A client that is not a balancer cannot choose its address: its header is
        # not read, so the SSH server sees garbage instead of a version line.
        sock.sendall(proxy.v1_header(("192.0.2.77", 1), ("127.0.0.1", 22)))
        sock.recv(256)
        assert not any(c.address == "192.0.2.77" for c in server.gateway.connections)


def test_limits_apply_to_the_header_address(gateway_factory, tmp_path: Path) -> None:
    server = gateway_factory(
        ssh={"proxy_protocol": "required", "proxy_allowed": ["127.0.0.1/32"]},
        limits={"max_connections_per_address": 1},
    )

    def connect(address: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), TIMEOUT)
        sock.sendall(proxy.v1_header((address, 1000), ("127.0.0.1", 22)))
        return sock

    first = connect("198.51.100.1")
    assert banner(first).startswith(b"SSH-2.0-")
    second = connect("198.51.100.1")  # same client behind the balancer: over its limit
    assert refused(second)
    third = connect("198.51.100.2")  # another client through the same balancer
    assert banner(third).startswith(b"SSH-2.0-")
    for sock in (first, second, third):
        sock.close()
