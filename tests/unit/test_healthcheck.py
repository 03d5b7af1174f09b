"""The container's HEALTHCHECK (`python -m gateway.healthcheck`): which URL, what it says."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway import config, healthcheck

ROOT = Path(__file__).resolve().parents[2]


def test_container_config_probes_its_own_loopback():
    cfg = config.load(ROOT / "config" / "container.toml")
    assert healthcheck.probe_url(cfg) == "http://127.0.0.1:8080/readyz"
    assert cfg.storage.repos == Path("/data/repos")
    assert cfg.ssh.host_key_dir == Path("/data/host_keys")


@pytest.mark.parametrize(
    ("http", "url"),
    [
        ({"listen": "[::]:9000"}, "http://[::1]:9000/readyz"),
        ({"listen": "10.1.2.3:8080"}, "http://10.1.2.3:8080/readyz"),
        (
            {"listen": "0.0.0.0:8080", "monitoring_listen": "0.0.0.0:9100"},
            "http://127.0.0.1:9100/readyz",
        ),
        ({"listen": ""}, None),
    ],
)
def test_probe_url(http: dict[str, str], url: str | None):
    assert healthcheck.probe_url(config.from_mapping({"http": http})) == url


@pytest.fixture
def readyz() -> Iterator[tuple[str, list[tuple[int, dict[str, object]]]]]:
    """A stand-in /readyz on loopback answering what the test puts in the list."""
    answers: list[tuple[int, dict[str, object]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers[0]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz", answers
    finally:
        server.shutdown()
        server.server_close()


def test_ready(readyz):
    url, answers = readyz
    answers.append((200, {"status": "ready", "checks": {"ssh": "ok"}}))
    out = io.StringIO()
    assert healthcheck.check(url, out) == 0
    assert out.getvalue() == f"ready ({url})\n"


def test_not_ready_names_the_failing_checks(readyz):
    url, answers = readyz
    checks = {"ssh": "ok", "database": "unreachable: disk I/O error", "repos": "ok"}
    answers.append((503, {"status": "not ready", "checks": checks}))
    out = io.StringIO()
    assert healthcheck.check(url, out) == 1
    assert out.getvalue() == f"not ready ({url}): database: unreachable: disk I/O error\n"


def test_no_answer_is_one_line(monkeypatch):
    # A port nobody listens on: the probe fails in one line, no traceback.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/readyz"
    out = io.StringIO()
    assert healthcheck.check(url, out) == 1
    assert out.getvalue().startswith(f"no answer from {url}: ")
    assert out.getvalue().count("\n") == 1


def test_proxy_settings_are_ignored(readyz, monkeypatch):
    # HTTP_PROXY set for webhooks must not send the probe through a proxy.
    url, answers = readyz
    answers.append((200, {"status": "ready", "checks": {}}))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert healthcheck.check(url, io.StringIO()) == 0


def test_main_with_a_broken_config(tmp_path, monkeypatch):
    bad = tmp_path / "gw.toml"
    bad.write_text("[http\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(bad))
    out = io.StringIO()
    assert healthcheck.main(out) == 1
    assert out.getvalue().startswith("config: ") and out.getvalue().count("\n") == 1
