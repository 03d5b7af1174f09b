"""The running gateway reads one configuration at use: each setting a reload applies reaches
every part that reads it, and with `[ssh] listen` on port 0 what users are shown names the
port actually bound (in-process gateway; SIGHUP itself is tested in test_shutdown.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import at_use
from gateway.deploys.messages import logs_command
from tests.helpers import (
    Admin,
    ServerThread,
    http,
    http_base,
    keygen,
    registered_user,
    require_sandbox,
    write_config,
)
from tests.unit.test_settings import RELOADABLE, parsed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    thread = ServerThread(write_config(tmp_path_factory.mktemp("reload"))).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def admin(server: ServerThread) -> Admin:
    return Admin(server.config_path)


@pytest.fixture(scope="module")
def token(admin: Admin) -> str:
    return admin.ok("token", "create", "ops").split()[-1]


def reload(server: ServerThread, caplog: pytest.LogCaptureFixture, **change: Any) -> None:
    """Rewrite the file (the test defaults plus `change`) and reload it; it must apply."""
    write_config(server.config_path.parent, **change)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.server"):
        server.call(server.gateway._reload())
    assert "event=reloaded" in caplog.text, caplog.text
    assert "reload_needs_restart" not in caplog.text, caplog.text


def readers(server: ServerThread, section: str, key: str) -> dict[str, Any]:
    """What each part of the running gateway that reads `[section] key` sees now."""
    gateway = server.gateway
    seen = {"gateway": getattr(getattr(gateway.config, section), key)}
    assert gateway.web is not None
    seen["api"] = getattr(getattr(gateway.web.domain.config, section), key)
    if section in ("deploy", "cluster"):
        seen["deploys"] = getattr(getattr(gateway.deploys.config, section), key)
    if section == "limits":
        seen["admission"] = getattr(at_use(gateway.admission.settings), key)
    if (section, key) == ("limits", "user_ops_per_minute"):
        seen["rate"] = at_use(gateway.ssh.rate.per_minute)
    if (section, key) == ("limits", "max_commit_size"):
        seen["repos"] = gateway.repos.max_commit_size
        seen["deploys.repos"] = gateway.deploys.repos.max_commit_size
    if (section, key) == ("log", "level"):
        seen["root logger"] = logging.getLevelName(logging.getLogger().level).lower()
    return seen


@pytest.mark.parametrize(("section", "key"), list(RELOADABLE), ids="{0[0]}.{0[1]}".format)
def test_a_reload_reaches_every_reader(
    server: ServerThread, caplog: pytest.LogCaptureFixture, section: str, key: str
) -> None:
    if (section, key) == ("deploy", "command"):
        require_sandbox()  # a reload proves the new pipeline's sandbox can be built
    raw = RELOADABLE[section, key]
    before = readers(server, section, key)
    value = parsed(section, key, raw)
    assert value not in before.values()
    try:
        reload(server, caplog, **{section: {key: raw}})
        assert readers(server, section, key) == dict.fromkeys(before, value)
    finally:
        reload(server, caplog)
    assert readers(server, section, key) == before


def test_a_reload_reaches_app_overrides(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        reload(server, caplog, **{"apps.web": {"mode": "gate"}})
        assert server.gateway.deploys.config.deploy_for("web").mode == "gate"
        assert server.gateway.deploys.config.deploy_for("api").mode == "attached"
    finally:
        reload(server, caplog)
    assert server.gateway.deploys.config.deploy_for("web").mode == "attached"


def test_a_reload_reaches_the_api_key_limit(
    server: ServerThread, admin: Admin, token: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[limits] max_keys_per_user, observed where it acts: the API refuses a second key."""
    client = registered_user(server, admin, tmp_path, "keys")
    second = keygen(tmp_path / "second").with_suffix(".pub").read_text().strip()
    url = f"{http_base(server)}/api/v1/users/{client.name}/keys"
    try:
        reload(server, caplog, limits={"max_keys_per_user": 1})
        refused = http("POST", url, token, {"name": "second", "key": second})
        assert refused.status == 409, refused.body
        assert "has 1 keys" in refused.json()["error"]["message"]
    finally:
        reload(server, caplog)


def test_what_needs_a_restart_is_logged_and_kept(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    running = server.gateway.config
    try:
        write_config(server.config_path.parent, ssh={"login_timeout": 5}, log={"format": "json"})
        with caplog.at_level(logging.INFO, logger="gateway.server"):
            server.call(server.gateway._reload())
        assert "event=reload_needs_restart section=ssh" in caplog.text
        assert "event=reload_needs_restart setting=log.format" in caplog.text
        assert "event=reloaded" in caplog.text
        assert server.gateway.config.ssh == running.ssh
        assert server.gateway.config.log == running.log
    finally:
        reload(server, caplog)


def test_regression_port_0_api_and_ssh_info_show_the_bound_port(
    server: ServerThread, admin: Admin, token: str, tmp_path: Path
) -> None:
    """Issue 21: with `listen` on port 0, GET /api/v1/apps/X answered ssh://git@127.0.0.1:0/
    while the server listened on another port; SSH `info` and deploy messages showed the
    same. Every reader now takes the configuration the listener updated."""
    assert server.config.ssh.listen[1] == 0 and server.port != 0
    client = registered_user(server, admin, tmp_path, "port")
    created = admin.ok("app", "create", "portapp", "--owner", client.name)
    wanted = f"ssh://git@127.0.0.1:{server.port}/portapp.git"
    # The CLI reads the file (port 0) in its own process: it asks the running gateway.
    assert f"clone URL: {wanted}" in created
    assert wanted in admin.ok("app", "list")
    shown = http("GET", f"{http_base(server)}/api/v1/apps/portapp", token)
    assert shown.status == 200 and shown.json()["clone_url"] == wanted
    listed = http("GET", f"{http_base(server)}/api/v1/apps", token).json()
    assert {a["clone_url"] for a in listed if a["name"] == "portapp"} == {wanted}
    info = client.ssh("info")
    assert wanted in info.stdout + info.stderr
    assert not re.search(r"127\.0\.0\.1:0\b|-p 0\b", info.stdout + info.stderr)
    # What deploy messages tell the pusher to run, from the deploy service's configuration.
    assert f"-p {server.port} " in logs_command(server.gateway.deploys.config, "portapp", 1)
