"""Webhook receivers are tenants' servers: slow, redirecting or flooding ones cost a bounded
attempt and never stall probes or other apps' pushes."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    DEPLOY_PYTHON,
    TIMEOUT,
    Admin,
    Client,
    GatewayFactory,
    GatewayHandle,
    LiveProcess,
    ServerThread,
    http,
    http_base,
    keygen,
    require_sandbox,
    sandbox_settings,
    unique,
    write_config,
)

HUGE = 100 * 1024 * 1024


class Receiver:
    """Raw-socket webhook receivers on 127.0.0.1, one behaviour per path:

    /ok       answers 204 at once
    /tarpit   reads the request, then never answers (until the gateway hangs up)
    /trickle  sends its status line one byte every 0.2 s, forever
    /redirect answers 307 to /ok (which must then see nothing)
    /huge     answers 200 with a 100 MiB body, sent as fast as the gateway takes it
    """

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.huge_sent: list[int] = []  # bytes of the body sent, per /huge request
        self.changed = threading.Condition()
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(5 * TIMEOUT)  # tarpits hold on until the gateway gives up
                path = receiver._read_request(sock)
                with receiver.changed:
                    receiver.requests[path] = receiver.requests.get(path, 0) + 1
                    receiver.changed.notify_all()
                # OSError: the gateway hung up, which is what these tests expect.
                with contextlib.suppress(OSError):
                    getattr(receiver, "_" + path.strip("/"), receiver._ok)(sock)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        with self.changed:
            return self.requests.get(path, 0)

    def wait_for(self, path: str, count: int, timeout: float = TIMEOUT) -> None:
        with self.changed:
            reached = self.changed.wait_for(lambda: self.requests.get(path, 0) >= count, timeout)
            assert reached, f"{self.requests.get(path, 0)} requests to {path}, not {count}"

    @staticmethod
    def _read_request(sock: socket.socket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return "?"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return lines[0].split(" ")[1]

    def _ok(self, sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    def _tarpit(self, sock: socket.socket) -> None:
        sock.recv(1)  # returns when the gateway closes the connection

    def _trickle(self, sock: socket.socket) -> None:
        while True:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: ":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)

    def _redirect(self, sock: socket.socket) -> None:
        sock.sendall(
            f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {self.url('/ok')}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )

    def _huge(self, sock: socket.socket) -> None:
        sent = 0
        chunk = b"x" * 65536
        try:
            sock.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {HUGE}\r\n"
                "\r\n".encode()
            )
            while sent < HUGE:
                sock.sendall(chunk)
                sent += len(chunk)
        finally:
            with self.changed:
                self.huge_sent.append(sent)
                self.changed.notify_all()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def start_gateway(directory: Path, deploy: dict[str, object], apps: str = "") -> ServerThread:
    if "command" in apps:  # an app's own command pipeline runs in the sandbox
        require_sandbox()
        deploy = {**sandbox_settings(directory), **deploy}
    config = write_config(directory, deploy=deploy)
    config.write_text(config.read_text() + apps)
    return ServerThread(config).start()


def developer(server: ServerThread, tmp_path: Path) -> tuple[Admin, Client]:
    admin = Admin(server.config_path)
    name = unique("hookdev")
    key = keygen(tmp_path / f"{name}_id")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "laptop", f"{key}.pub")
    return admin, Client(tmp_path / f"home-{name}", key, server, name=name)


def deploys(admin: Admin, app: str) -> list[dict[str, object]]:
    return json.loads(admin.ok("deploy", "list", app, "--json"))


def attempts(admin: Admin, deploy_id: object) -> list[dict[str, object]]:
    return json.loads(admin.ok("deploy", "show", str(deploy_id), "--json"))["webhook_deliveries"]


@pytest.fixture(scope="module")
def bounded(module_gateways: GatewayFactory, receiver: Receiver) -> GatewayHandle:
    """A gateway whose apps each point at one misbehaving receiver, 2 s per attempt."""
    apps = "".join(
        f'[apps.{name}]\nwebhook_url = "{receiver.url("/" + name)}"\n'
        for name in ("trickle", "redirect", "huge")
    )
    return module_gateways(
        apps,
        name="hooks",
        deploy={"webhook_url": receiver.url("/ok"), "webhook_timeout": 2, "webhook_attempts": 3},
    )


def push_to(admin: Admin, dev: Client, app: str, tmp_path: Path) -> str:
    admin.ok("app", "create", app, "--owner", dev.name)
    work = dev.new_repo(tmp_path / f"work-{app}")
    return dev.git("push", dev.url(app), "main", cwd=work, check=False).stderr


def test_regression_webhook_redirect_is_not_followed(
    bounded: ServerThread, receiver: Receiver, tmp_path: Path
) -> None:
    admin, dev = developer(bounded, tmp_path)
    before = receiver.count("/ok")
    out = push_to(admin, dev, "redirect", tmp_path)
    assert "webhook attempt 1/3: HTTP 307" in out
    [record] = deploys(admin, "redirect")
    assert record["status"] == "failed"
    assert record["reason"] == "webhook refused (HTTP 307: redirects are not followed)"
    # The deploy has ended: a followed redirect would have reached /ok before that.
    assert receiver.count("/redirect") == 1 and receiver.count("/ok") == before
    assert [a["status_code"] for a in attempts(admin, record["id"])] == [307]


def test_regression_webhook_trickling_receiver_gets_one_deadline(
    bounded: ServerThread, receiver: Receiver, tmp_path: Path
) -> None:
    """A receiver that sends a byte now and then never trips a per-read timeout; the
    attempt's total deadline ends it anyway."""
    admin, dev = developer(bounded, tmp_path)
    out = push_to(admin, dev, "trickle", tmp_path)
    assert "webhook attempt 3/3: no answer within 2s" in out
    [record] = deploys(admin, "trickle")
    assert record["status"] == "failed"
    tries = attempts(admin, record["id"])
    assert [a["error"] for a in tries] == ["no answer within 2s"] * 3
    assert all(1900 <= int(a["duration_ms"]) < 3500 for a in tries), tries  # type: ignore[call-overload]


def test_regression_webhook_huge_answer_is_not_read(
    bounded: ServerThread, receiver: Receiver, tmp_path: Path
) -> None:
    admin, dev = developer(bounded, tmp_path)
    started = time.monotonic()
    out = push_to(admin, dev, "huge", tmp_path)
    assert "webhook attempt 1/3: HTTP 200" in out
    [record] = deploys(admin, "huge")
    assert record["status"] == "succeeded"
    [attempt] = attempts(admin, record["id"])
    assert attempt["status_code"] == 200 and int(attempt["duration_ms"]) < 2000  # type: ignore[call-overload]
    # The gateway hung up after the status line: the receiver could only push what fits
    # in the sockets' buffers, nowhere near the 100 MiB it announced.
    with receiver.changed:
        assert receiver.changed.wait_for(lambda: receiver.huge_sent, TIMEOUT)
        sent = receiver.huge_sent[0]
    assert sent < 16 * 1024 * 1024, sent
    assert time.monotonic() - started < 30


def test_regression_slow_receivers_do_not_stall_probes_or_pushes(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Ten receivers that never answer (more than the default thread pool's workers) while
    /readyz answers at once and another app's push deploys."""
    slow = 10
    server = start_gateway(
        tmp_path / "gw",
        {
            "webhook_url": receiver.url("/tarpit"),
            "webhook_timeout": 120,
            "webhook_attempts": 1,
            "mode": "detached",
            "max_parallel": slow + 2,
        },
        f'[apps.other]\ncommand = ["{DEPLOY_PYTHON}", "-c", "print(\'other app deployed\')"]\n'
        'mode = "attached"\n',
    )
    try:
        admin, dev = developer(server, tmp_path)
        work = dev.new_repo(tmp_path / "work")
        before = receiver.count("/tarpit")
        apps = [unique("tarpit") for _ in range(slow)]
        for app in [*apps, "other"]:
            admin.ok("app", "create", app, "--owner", dev.name)
        pushes = [
            LiveProcess(["git", "push", "-q", dev.url(app), "main"], env=dev.env, cwd=work)
            for app in apps
        ]
        for pushing in pushes:
            assert pushing.finish() == 0, pushing.stderr
        # Every delivery is stuck at once: none waits for a worker thread to free up.
        receiver.wait_for("/tarpit", before + slow, timeout=30)

        started = time.monotonic()
        ready = http("GET", http_base(server) + "/readyz")
        assert ready.status == 200, ready.body
        assert time.monotonic() - started < 5

        started = time.monotonic()
        out = dev.git("push", dev.url("other"), "main", cwd=work).stderr
        assert "remote: other app deployed" in out and "succeeded" in out
        assert time.monotonic() - started < 30
        assert receiver.count("/tarpit") == before + slow  # still stuck, none retried
    finally:
        started = time.monotonic()
        server.stop()
        # Stopping cancels the stuck deliveries instead of waiting for their deadlines.
        assert time.monotonic() - started < 30
