"""The running configuration (gateway.config.Settings): what a reload applies, what it keeps
until a restart, and the port the SSH listener actually bound."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

from gateway import config
from gateway.config import Settings
from gateway.config.holder import RESTART_KEYS, RESTART_SECTIONS

# Every setting a reload applies, with a value other than its default. A new setting in a
# reloadable section must be added here (test_every_reloadable_setting_is_tried says so),
# and then e2e/test_reload.py checks that the running gateway's readers see it.
RELOADABLE: dict[tuple[str, str], Any] = {
    ("limits", "max_connections"): 7,
    ("limits", "max_connections_per_address"): 6,
    ("limits", "max_unauthenticated"): 5,
    ("limits", "max_sessions_per_connection"): 3,
    ("limits", "channel_request_timeout"): 4,
    ("limits", "max_auth_attempts"): 2,
    ("limits", "idle_timeout"): 30,
    ("limits", "user_ops_per_minute"): 1,
    ("limits", "max_keys_per_user"): 1,
    ("limits", "drain_timeout"): 5,
    ("limits", "max_commit_size"): "2K",
    ("limits", "max_connections_per_user"): 2,
    ("limits", "max_fetches_per_user"): 2,
    ("limits", "max_pushes_per_user"): 2,
    ("deploy", "branch"): "production",
    ("deploy", "command"): ["/bin/true"],
    ("deploy", "webhook_url"): "https://deploy.example/hook",
    ("deploy", "webhook_secret"): "s3cret",
    ("deploy", "mode"): "gate",
    ("deploy", "timeout"): 30,
    ("deploy", "max_parallel"): 1,
    ("deploy", "log_limit"): "4K",
    ("deploy", "webhook_timeout"): 3,
    ("deploy", "webhook_attempts"): 1,
    ("deploy", "webhook_backoff"): 2,
    ("deploy", "sandbox"): "none",
    ("deploy", "sandbox_read_paths"): ["/opt"],
    ("deploy", "sandbox_write_paths"): ["/srv/cache"],
    ("deploy", "network"): "none",
    ("deploy", "sandbox_user"): "nobody",
    ("deploy", "build_dir"): "/tmp/gateway-builds-elsewhere",
    ("deploy", "max_export_size"): "2M",
    ("deploy", "max_output"): "2M",
    ("deploy", "max_cpu_seconds"): 5,
    ("deploy", "max_memory"): "64M",
    ("deploy", "max_processes"): 8,
    ("deploy", "max_file_size"): "2M",
    ("deploy", "max_open_files"): 64,
    ("deploy", "max_tmp_size"): "2M",
    ("deploy", "max_build_size"): "8M",
    ("deploy", "retention"): 3,
    ("deploy", "keep_last"): 2,
    ("audit", "retention"): 30,
    ("log", "level"): "debug",
    ("cluster", "node_timeout"): 9,
    ("cluster", "cache_seconds"): 5,
}


def loaded(data: dict[str, Any] | None = None) -> config.Config:
    base: dict[str, Any] = {"ssh": {"listen": "127.0.0.1:0"}}
    for section, values in (data or {}).items():
        base[section] = {**base.get(section, {}), **values}
    return config.from_mapping(base)


def parsed(section: str, key: str, raw: Any) -> Any:
    spec = next(f for f in fields(config.SECTIONS[section]) if f.name == key)
    return spec.metadata["parse"](raw)


def test_every_reloadable_setting_is_tried() -> None:
    restart_keys = set(RESTART_KEYS)
    reloadable = {
        (section, spec.name)
        for section, cls in config.SECTIONS.items()
        if section not in RESTART_SECTIONS
        for spec in fields(cls)
        if (section, spec.name) not in restart_keys
    }
    assert reloadable == set(RELOADABLE)


@pytest.mark.parametrize(("section", "key"), list(RELOADABLE), ids="{0[0]}.{0[1]}".format)
def test_a_reload_applies(section: str, key: str) -> None:
    settings = Settings(loaded())
    value = parsed(section, key, RELOADABLE[section, key])
    assert getattr(getattr(settings.current, section), key) != value
    assert settings.reload(loaded({section: {key: RELOADABLE[section, key]}})) == []
    assert getattr(getattr(settings.current, section), key) == value


def test_a_reload_applies_app_overrides() -> None:
    settings = Settings(loaded())
    new = loaded({"apps": {"web": {"mode": "gate", "max_memory": "1G"}}})
    assert settings.reload(new) == []
    assert settings.current.deploy_for("web").mode == "gate"
    assert settings.current.deploy_for("web").max_memory == 1024**3
    assert settings.current.deploy_for("api").mode == "attached"


@pytest.mark.parametrize(
    ("change", "reported"),
    [
        ({"ssh": {"login_timeout": 5}}, "ssh"),
        ({"server": {"drain_accept_seconds": 1}}, "server"),
        ({"git": {"pack_cache": False}}, "git"),
        ({"http": {"secure_cookies": True}}, "http"),
        ({"storage": {"repos": "/srv/elsewhere"}}, "storage"),
        ({"deploy": {"log_dir": "/srv/elsewhere", "max_parallel": 1}}, "deploy.log_dir"),
        ({"log": {"format": "json", "level": "debug"}}, "log.format"),
        ({"cluster": {"node_name": "other", "node_timeout": 9}}, "cluster.node_name"),
    ],
)
def test_what_needs_a_restart_is_reported_and_kept(change: dict[str, Any], reported: str) -> None:
    start = loaded()
    settings = Settings(start)
    new = loaded(change)
    assert settings.reload(new) == [reported]
    section, _, key = reported.partition(".")
    running = getattr(settings.current, section)
    if not key:
        assert running == getattr(start, section)
        return
    # That key runs as it started; the rest of its section is applied.
    assert getattr(running, key) == getattr(getattr(start, section), key)
    for other in change[section]:
        if other != key:
            assert getattr(running, other) == getattr(getattr(new, section), other)


def test_regression_port_0_clone_urls_name_the_bound_port() -> None:
    """Issue 21: with `listen` on port 0 the API showed ssh://git@127.0.0.1:0/... while the
    server listened on another port. The holder takes the bound port once; every reader of
    `current` (API, SSH info, deploy messages) shows it, and so does it after a reload."""
    settings = Settings(loaded())
    assert settings.current.clone_url("web") == "ssh://git@127.0.0.1:0/web.git"
    settings.bound([("127.0.0.1", 39369)])
    assert settings.current.clone_url("web") == "ssh://git@127.0.0.1:39369/web.git"
    assert settings.current.ssh_command("info") == "ssh -p 39369 git@127.0.0.1 info"
    assert settings.ssh_addresses == [("127.0.0.1", 39369)]
    # Port 0 in the file is not a change of [ssh] at a reload, and the bound port stays.
    assert settings.reload(loaded()) == []
    assert settings.current.clone_url("web") == "ssh://git@127.0.0.1:39369/web.git"


def test_a_configured_port_is_shown_as_configured() -> None:
    settings = Settings(config.from_mapping({"ssh": {"listen": "127.0.0.1:2222"}}))
    settings.bound([("127.0.0.1", 2222)])
    assert settings.current.clone_url("web") == "ssh://git@127.0.0.1:2222/web.git"
    public = config.from_mapping(
        {"ssh": {"listen": "127.0.0.1:0", "public_address": "git.example.com"}}
    )
    settings = Settings(public)
    settings.bound([("127.0.0.1", 40000)])
    assert settings.current.clone_url("web") == "git@git.example.com:web.git"
