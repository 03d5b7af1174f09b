"""Adversarial HTTP clients: slow headers and bodies, huge bodies, too many connections,
file descriptor exhaustion; and probes on a listener of their own."""

from __future__ import annotations

import contextlib
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    TIMEOUT,
    GatewayFactory,
    GatewayHandle,
    LiveProcess,
    ServerThread,
    http,
    http_base,
    write_config,
)

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def strict(module_gateways: GatewayFactory) -> GatewayHandle:
    """A gateway with small HTTP limits and a monitoring listener."""
    return module_gateways(
        name="http",
        http={
            "listen": "127.0.0.1:0",
            "monitoring_listen": "127.0.0.1:0",
            "header_timeout": HEADER_TIMEOUT,
            "body_timeout": BODY_TIMEOUT,
            "max_body_size": MAX_BODY,
            "max_connections": MAX_CONNECTIONS,
        },
    )


def address(server: ServerThread) -> tuple[str, int]:
    found = server.gateway.deploys.http_address
    assert found is not None
    return found


def monitoring_base(server: ServerThread) -> str:
    assert server.gateway.web is not None and server.gateway.web.monitoring_address
    host, port = server.gateway.web.monitoring_address
    return f"http://{host}:{port}"


def connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(address(server), timeout=TIMEOUT)


def closed_after(sock: socket.socket) -> tuple[bytes, float]:
    """Read until the server closes; what it sent and how long that took."""
    started, data = time.monotonic(), b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - started


def settled(server: ServerThread) -> None:
    """Wait until the main HTTP listener holds no connection."""
    assert server.gateway.web is not None
    main = server.gateway.web.main
    server.wait_until(lambda: main.open == 0)


def rejections(server: ServerThread, limit: str) -> float:
    value = server.gateway.metrics.registry.get_sample_value(
        "gateway_limit_rejections_total", {"limit": limit}
    )
    return value or 0.0


def test_regression_http_half_header_is_cut_at_the_header_timeout(strict: ServerThread) -> None:
    before = rejections(strict, "http_header_timeout")
    with connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        data, elapsed = closed_after(sock)
    assert data == b"" and HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 3
    assert rejections(strict, "http_header_timeout") == before + 1


def test_regression_http_trickled_headers_do_not_extend_the_deadline(
    strict: ServerThread,
) -> None:
    """One header byte every 0.1 s: each byte would reset an idle timer, not this one."""
    with connect(strict) as sock:
        started = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
        with contextlib.suppress(OSError):
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)  # the slow client's pace, not a synchronization
        data, _ = closed_after(sock)
    assert data == b"" and time.monotonic() - started < HEADER_TIMEOUT + 3


def test_regression_http_trickled_body_is_cut_at_the_body_timeout(strict: ServerThread) -> None:
    with connect(strict) as sock:
        sock.sendall(
            b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"name": '
        )
        data, elapsed = closed_after(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b'"request_timeout"' in data
    assert BODY_TIMEOUT * 0.8 <= elapsed < BODY_TIMEOUT + 3


def test_regression_http_declared_huge_body_gets_413_unread(strict: ServerThread) -> None:
    """100 MiB announced: the answer comes before the body, and a client that goes on
    sending is cut off after a little more, instead of being read to the end."""
    with connect(strict) as sock:
        sock.sendall(
            b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {100 * 1024 * 1024}\r\n\r\n".encode()
            + b"x" * 16384
        )
        started = time.monotonic()
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert time.monotonic() - started < 2
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 100 * 1024 * 1024:
                sent += sock.send(b"x" * 65536)
    # What got through is what the sockets' buffers hold, not the 100 MiB.
    assert sent < 16 * 1024 * 1024, sent


def test_regression_http_chunked_body_over_the_limit_gets_413(strict: ServerThread) -> None:
    chunk = b"x" * 16384
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8)) + b"0\r\n\r\n"
    with connect(strict) as sock:
        sock.sendall(
            b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body
        )
        data, _ = closed_after(sock)
    assert data.startswith(b"HTTP/1.1 413 "), data


def test_regression_http_connection_cap(strict: ServerThread) -> None:
    settled(strict)
    before = rejections(strict, "http_max_connections")
    idle = [connect(strict) for _ in range(MAX_CONNECTIONS)]
    try:
        assert strict.gateway.web is not None
        strict.wait_until(lambda: strict.gateway.web.main.open == MAX_CONNECTIONS)  # type: ignore[union-attr]
        with connect(strict) as extra:
            data, elapsed = closed_after(extra)
        assert data.startswith(b"HTTP/1.1 503 ") and elapsed < 2
        assert rejections(strict, "http_max_connections") == before + 1
        # The monitoring listener has its own connections: probes still answer.
        assert http("GET", monitoring_base(strict) + "/readyz").status == 200
    finally:
        for sock in idle:
            sock.close()
    settled(strict)
    assert http("GET", http_base(strict) + "/healthz").status == 200


def test_monitoring_listener_serves_probes_and_metrics_only(strict: ServerThread) -> None:
    monitoring, main = monitoring_base(strict), http_base(strict)
    assert http("GET", monitoring + "/healthz").json() == {"status": "ok"}
    assert http("GET", monitoring + "/readyz").status == 200
    metrics = http("GET", monitoring + "/metrics")
    assert metrics.status == 200 and b"gateway_http_requests_total" in metrics.body
    for path in ("/api/v1/users", "/keys", "/openapi.json"):
        assert http("GET", monitoring + path).status == 404
    # The main listener keeps the probes (balancers check them there) but not the metrics.
    assert http("GET", main + "/readyz").status == 200
    assert http("GET", main + "/metrics").status == 404


def test_unknown_routes_and_methods_answer_json(strict: ServerThread) -> None:
    """Every listener answers an unknown route or method in the API's JSON error shape."""
    main, monitoring = http_base(strict), monitoring_base(strict)
    hint = " (the API is under /api/v1, described at /openapi.json)"
    for base, path, extra in (
        (main, "/api/v1/nope", hint),
        (main, "/api/v2/users", hint),
        (main, "/keys/nope", hint),
        (main, "/metrics", hint),
        (monitoring, "/api/v1/users", ""),
    ):
        reply = http("GET", base + path)
        assert reply.status == 404 and reply.headers["Content-Type"].startswith("application/json")
        assert reply.json() == {
            "error": {"code": "not_found", "message": f"no such route: GET {path}{extra}"}
        }
    for base in (main, monitoring):
        reply = http("DELETE", base + "/healthz")
        assert reply.status == 405 and reply.headers["Allow"] == "GET,HEAD"
        assert reply.json() == {
            "error": {
                "code": "method_not_allowed",
                "message": "DELETE is not allowed on /healthz: use GET, HEAD",
            }
        }


def test_regression_an_unknown_path_is_not_echoed_raw(strict: ServerThread) -> None:
    """A hostile path comes back escaped and cut, in JSON that is never sniffed as markup."""
    reply = http("GET", http_base(strict) + "/%1B%5B31m%3Cscript%3E" + "x" * 5000)
    assert reply.status == 404 and reply.headers["X-Content-Type-Options"] == "nosniff"
    message = reply.json()["error"]["message"]
    assert message.startswith("no such route: GET /\\x1b[31m<script>xxx")
    assert "\x1b" not in message and len(message) < 200


def test_regression_http_fd_exhaustion_does_not_flood_the_log(tmp_path: Path) -> None:
    """Out of file descriptors, the listener pauses accepting and says so once; once
    descriptors are free again it serves."""
    config = write_config(
        tmp_path, http={"listen": "127.0.0.1:0", "header_timeout": 120, "max_connections": 5000}
    )
    limit = 64
    launcher = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'gateway', '--config', sys.argv[1], "
        "'serve'])"
    )
    gateway = LiveProcess([sys.executable, "-c", launcher, str(config)])
    clients: list[socket.socket] = []
    try:
        port = int(gateway.wait_for(r"event=http_listening address=127\.0\.0\.1:(\d+)").group(1))
        gateway.wait_for(r"event=listening address=127\.0\.0\.1:\d+")
        # Twice as many idle connections as the gateway has descriptors.
        for _ in range(2 * limit):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        gateway.wait_for(r"event=http_accept_failed .*Too many open files")
        exhausted = time.monotonic()
        # Stay exhausted long enough for a per-retry log line to show (asyncio logs one a
        # second; the retry pauses here are 0.05 s to 1 s).
        time.sleep(3)  # an observation window, not a synchronization
        for sock in clients:
            sock.close()
        clients.clear()
        served = None
        deadline = time.monotonic() + TIMEOUT
        while served is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                served = http("GET", f"http://127.0.0.1:{port}/healthz").status
        assert served == 200
        gateway.wait_for(r"event=http_accept_resumed")
        assert time.monotonic() - exhausted >= 3
    finally:
        for sock in clients:
            sock.close()
        gateway.proc.terminate()
        gateway.finish()
    failures = [line for line in gateway.lines if "accept" in line and "event=http_" in line]
    assert len(failures) <= 3, "".join(failures)
    assert not [line for line in gateway.lines if "Traceback" in line or "socket.accept" in line]
    assert re.search(r"event=http_accept_resumed listener=main failures=\d+", gateway.stderr)


def test_regression_http_slow_reader_is_cut_at_the_header_timeout(strict: ServerThread) -> None:
    """A client that asks and never reads the answer holds its connection no longer than a
    slow sender would."""
    settled(strict)
    with connect(strict) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        started = time.monotonic()
        # Pipelined requests whose answers pile up unread.
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        assert strict.gateway.web is not None
        main = strict.gateway.web.main
        strict.wait_until(lambda: main.open == 0, timeout=HEADER_TIMEOUT + 10)
    assert time.monotonic() - started < HEADER_TIMEOUT + 10


def test_regression_a_deeply_nested_body_is_a_400_not_a_500(strict: ServerThread) -> None:
    """Deeply nested `[` to an API route (100,000 in the review; 60,000 fit this body
    limit) made json's decoder raise RecursionError: a 500 and a traceback in the log. Now
    one line, 422, like any other bad body."""
    from tests.helpers import Admin

    token = Admin(strict.config_path).ok("token", "create", "deep").strip().splitlines()[-1]
    reply = http("POST", f"{http_base(strict)}/api/v1/users", token, raw=b"[" * 60_000)
    assert reply.status == 422, reply.body
    assert reply.json()["error"]["message"] == "the request body nests deeper than 32 levels"
