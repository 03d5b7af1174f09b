"""Fixtures for the end-to-end tests: the operator CLI of a module's own gateway, and a
gateway with small limits."""

from __future__ import annotations

import pytest

from tests.helpers import Admin, Client, GatewayFactory, GatewayHandle, keygen, unique


@pytest.fixture(scope="module")
def admin(request: pytest.FixtureRequest) -> Admin:
    """The operator CLI of the gateway this module's tests use: its `gw` when that is a
    GatewayHandle (started with module_gateways), else `server` (the session's shared
    gateway, unless the module overrides it)."""
    try:
        gateway = request.getfixturevalue("gw")
    except pytest.FixtureLookupError:
        gateway = None
    if isinstance(gateway, GatewayHandle):
        return gateway.admin
    return Admin(request.getfixturevalue("server").config_path)


@pytest.fixture(scope="module")
def tight(module_gateways: GatewayFactory) -> GatewayHandle:
    """A gateway with small limits, so that tests can reach them."""
    return module_gateways(
        name="tight",
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


@pytest.fixture
def tight_user(tight: GatewayHandle, tmp_path) -> Client:
    admin = tight.admin
    name, app = unique("lim"), unique("limapp")
    key = keygen(tmp_path / f"{name}_id")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", name)
    client = Client(tmp_path / f"home-{name}", key, tight, name=name)
    client.app = app  # type: ignore[attr-defined]
    return client
