"""SIGTERM drains running work then exits 0; SIGHUP reloads what can change while running."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    Admin,
    Client,
    LiveProcess,
    ServeProcess,
    keygen,
    write_config,
)


@pytest.fixture
def running(tmp_path):
    """A real gateway process with one user and app; yields (process, client, config)."""
    config = write_config(
        tmp_path / "state",
        deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], "timeout": 60},
        limits={"drain_timeout": 30},
    )
    admin = Admin(config)
    key = keygen(tmp_path / "id")
    admin.ok("user", "add", "ana")
    admin.ok("key", "add", "ana", "k", f"{key}.pub")
    admin.ok("app", "create", "web", "--owner", "ana")
    gateway = ServeProcess(config)
    client = Client(tmp_path / "home", key, gateway, name="ana")
    yield gateway, client, config
    if gateway.proc.poll() is None:
        gateway.kill()


def test_sigterm_lets_an_attached_deploy_finish(running, tmp_path, exchange):
    gateway, client, _ = running
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = client.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    pushing = LiveProcess(["git", "push", client.url("web"), "main"], env=client.env, cwd=work)
    pushing.wait_for(r"remote: waiting for the test")
    gateway.proc.send_signal(signal.SIGTERM)
    gateway.wait_for(r"event=draining sessions=1")
    # Draining: no new connections are accepted...
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", client.server.port), timeout=10)
    # ...and the running push and its deploy complete.
    with open(fifo, "w") as release:
        release.write("go\n")
    code = pushing.finish()
    assert code == 0, pushing.stderr
    assert "succeeded" in pushing.stderr
    assert gateway.finish() == 0
    assert "event=stopped" in gateway.stderr


def test_sighup_reloads_limits(running, tmp_path):
    gateway, client, config = running
    assert client.git("ls-remote", client.url("web")).returncode == 0
    config.write_text(
        config.read_text().replace("[limits]\n", "[limits]\nuser_ops_per_minute = 1\n")
    )
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for(r"event=reloaded")
    results = [client.git("ls-remote", client.url("web"), check=False) for _ in range(2)]
    assert results[1].returncode != 0 and "limit 1 per minute" in results[1].stderr
    # A broken file is refused and the running configuration stays.
    config.write_text(config.read_text() + "[limits]\nbogus = 1\n")
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for(r"event=reload_failed")
    assert gateway.stop() == 0
