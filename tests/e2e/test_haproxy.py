"""config/haproxy.cfg, run by a real HAProxy in front of a gateway that requires PROXY v2."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_proxy_protocol import Via
from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    LiveProcess,
    ServerThread,
    keygen,
    unique,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
REQUIRED = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"  # CI installs haproxy: never skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_config(server: ServerThread, bind_port: int) -> str:
    """The committed example with this machine's addresses: one gateway node on loopback."""
    http_port = server.gateway.deploys.http_address[1]  # type: ignore[index]
    text = (ROOT / "config" / "haproxy.cfg").read_text()
    replacements = {
        "log stdout format raw local0": "log stderr format raw local0",
        "bind :22": f"bind 127.0.0.1:{bind_port}",
        "check port 8080": f"check port {http_port}",
        "server gw1 10.0.0.11:2222": f"server gw1 127.0.0.1:{server.port}",
        "    server gw2 10.0.0.12:2222\n": "",
        "inter 2s": "inter 500ms",
    }
    for old, new in replacements.items():
        assert old in text, f"config/haproxy.cfg no longer has {old!r}"
        text = text.replace(old, new)
    return text


def wait_for_first_check(node: ServerThread) -> None:
    """HAProxy checks /readyz once it runs: its first check says it is up and listening."""
    registry = node.gateway.metrics.registry
    route = {"route": "/readyz", "code": "200"}
    node.wait_until(
        lambda: (registry.get_sample_value("gateway_http_requests_total", route) or 0) > 0
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ServerThread]:
    if not Path(HAPROXY).exists():
        if REQUIRED:
            pytest.fail("haproxy is not installed")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    server = ServerThread(
        write_config(
            tmp_path / "gw",
            ssh={"proxy_protocol": "required", "proxy_allowed": ["127.0.0.1/32"]},
        )
    ).start()
    yield server
    server.stop()


def test_push_through_haproxy_and_drain_on_readyz(node: ServerThread, tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(local_config(node, port))
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert check.returncode == 0, check.stdout + check.stderr
    balancer = LiveProcess([HAPROXY, "-db", "-f", str(cfg)])
    try:
        wait_for_first_check(node)
        registry = node.gateway.metrics.registry
        admin = Admin(node.config_path)
        user, app = unique("hap"), unique("hapapp")
        key = keygen(tmp_path / "key")
        admin.ok("user", "add", user)
        admin.ok("key", "add", user, "laptop", f"{key}.pub")
        admin.ok("app", "create", app, "--owner", user)
        client = Client(tmp_path / "home", key, Via(node, port), name=user)  # type: ignore[arg-type]
        repo = client.new_repo(tmp_path / "work")
        client.git("push", "-q", client.url(app), "main", cwd=repo, check=True)
        client.git("clone", "-q", client.url(app), str(tmp_path / "copy"), check=True)

        # Every connection came with a header the gateway accepted (it requires one).
        assert registry.get_sample_value("gateway_proxy_protocol_rejections_total") is None
        # A draining node answers 503 on /readyz: HAProxy takes it out of rotation.
        node.call(node.gateway.listener.close())
        balancer.wait_for(r"Server gateways/gw1 is DOWN")
    finally:
        balancer.kill()


def test_regression_a_refused_connection_is_retried_on_another_node(
    node: ServerThread, tmp_path: Path
) -> None:
    """A node whose port refuses (stopped or killed before the checks noticed): `retries`
    and `option redispatch` take the client to another node, which it never sees."""
    port, closed = free_port(), free_port()
    http_port = node.gateway.deploys.http_address[1]  # type: ignore[index]
    text = local_config(node, port).replace(
        f"    server gw1 127.0.0.1:{node.port}\n",
        # gw1's checks read the live node's /readyz: HAProxy believes it is up.
        f"    server gw1 127.0.0.1:{closed} check port {http_port}\n"
        f"    server gw2 127.0.0.1:{node.port}\n",
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    balancer = LiveProcess([HAPROXY, "-db", "-f", str(cfg)])
    try:
        wait_for_first_check(node)
        admin = Admin(node.config_path)
        user, app = unique("redis"), unique("redisapp")
        key = admin.enroll(user, tmp_path, app)
        client = Client(tmp_path / "home", key, Via(node, port), name=user)  # type: ignore[arg-type]
        for _ in range(6):
            assert client.git("ls-remote", client.url(app), check=False).returncode == 0
        # Connections refused by gw1 were redispatched to gw2: "+1" in the retries field.
        balancer.wait_for(r"git_ssh gateways/gw2 .*/\+1 ")
    finally:
        balancer.kill()
