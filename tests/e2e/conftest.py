"""Fixtures for the end-to-end tests that need a gateway with small limits."""

from __future__ import annotations

import pytest

from tests.helpers import Admin, Client, ServerThread, keygen, unique, write_config


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A gateway with small limits, so that tests can reach them."""
    directory = tmp_path_factory.mktemp("tight")
    config = write_config(
        directory,
        ssh={"login_timeout": 2},
        limits={
            "max_connections": 8,
            "max_connections_per_address": 6,
            "max_unauthenticated": 3,
            "max_sessions_per_connection": 2,
            "max_auth_attempts": 4,
            "idle_timeout": 1,
            "user_ops_per_minute": 3,
        },
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture
def tight_user(tight, tmp_path) -> Client:
    admin = Admin(tight.config_path)
    name, app = unique("lim"), unique("limapp")
    key = keygen(tmp_path / f"{name}_id")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", name)
    client = Client(tmp_path / f"home-{name}", key, tight, name=name)
    client.app = app  # type: ignore[attr-defined]
    return client
