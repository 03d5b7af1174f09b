"""SIGTERM drains running work then exits 0; SIGHUP reloads what can change while running."""

from __future__ import annotations

import logging
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
    ServerThread,
    http,
    http_base,
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
    key = Admin(config).enroll("ana", tmp_path, "web")
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
    gateway.wait_for(r"event=listener_closed .*sessions=1")
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


def test_regression_sighup_applies_deploy_settings(tmp_path, caplog):
    """A reload applies [deploy] max_parallel at once and the default branch of apps
    created through the API; log_dir is kept (earlier logs live there) and said to need a
    restart; a reload asking for a sandbox that cannot be built changes nothing."""
    config = write_config(tmp_path / "state", deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)]})
    server = ServerThread(config).start()
    try:
        admin = Admin(config)
        admin.ok("user", "add", "ana")
        secret = admin.ok("token", "create", "ops").split()[-1]
        original = config.read_text()
        log_dir = str(tmp_path / "state" / "deploys")
        changed = original.replace(log_dir, str(tmp_path / "elsewhere"))
        config.write_text(
            changed.replace("[deploy]\n", '[deploy]\nmax_parallel = 1\nbranch = "production"\n')
        )
        with caplog.at_level(logging.INFO, logger="gateway.server"):
            server.call(server.gateway._reload())
        deploys = server.gateway.deploys
        assert deploys.config.deploy.max_parallel == 1
        assert "event=reload_needs_restart setting=deploy.log_dir" in caplog.text
        assert deploys.config.deploy.log_dir == tmp_path / "state" / "deploys"
        created = http(
            "POST", f"{http_base(server)}/api/v1/apps", secret, {"name": "web", "owner": "ana"}
        )
        assert created.status == 201 and created.json()["deploy_branch"] == "production"
        config.write_text(original.replace("[deploy]\n", "[deploy]\nnetwork = false\n", 1))
        broken = config.read_text().replace('sandbox_user = "nobody"', 'sandbox_user = "nope-x"')
        if "nope-x" not in broken:  # not root: the file had no sandbox_user
            broken = broken.replace("[deploy]\n", '[deploy]\nsandbox_user = "nope-x"\n', 1)
        config.write_text(broken)
        with caplog.at_level(logging.INFO, logger="gateway.server"):
            server.call(server.gateway._reload())
        assert "event=reload_failed" in caplog.text and "no such user 'nope-x'" in caplog.text
        assert "section=ssh" not in caplog.text  # port 0 became a real port: not a change
        assert deploys.config.deploy.max_parallel == 1  # the running configuration stays
    finally:
        server.stop()
