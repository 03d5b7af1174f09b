"""Shared fixtures: one real gateway per session, fresh users and apps per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.deploys.builddir import remove_tree
from gateway.ssh import hostkeys
from tests import helpers, pg
from tests.helpers import (
    Admin,
    Client,
    GatewayFactory,
    ServerThread,
    require_tools,
    unique,
    write_config,
)

require_tools()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow proofs run in CI (GATEWAY_SLOW_TESTS=1); a developer's default run stays quick."""
    if os.environ.get("GATEWAY_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set GATEWAY_SLOW_TESTS=1 to run it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def sandbox_scratch() -> Iterator[None]:
    """Remove what test gateways shared with their deploy sandboxes, once all are done."""
    yield
    root = helpers._SANDBOX_ROOT
    if root is not None:
        remove_tree(root)


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.PostgresServer]:
    """One PostgreSQL server for the session (skipped without Debian's postgresql)."""
    server = pg.PostgresServer(pg.require_postgres())
    try:
        yield server.start()
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres: pg.PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres.create_database()


@pytest.fixture
def exchange() -> Path:
    """A directory this test shares with its deploys' sandboxes (FIFOs, dumps)."""
    return helpers.exchange_subdir("x")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    directory = tmp_path_factory.mktemp("gateway")
    thread = ServerThread(write_config(directory)).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def host_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host keys generated once, copied to the gateways of gateway_factory."""
    directory = tmp_path_factory.mktemp("hostkeys") / "hostkeys"
    hostkeys.load_or_create(directory)
    return directory


@pytest.fixture
def gateway_factory(
    tmp_path_factory: pytest.TempPathFactory, host_keys: Path
) -> Iterator[GatewayFactory]:
    """Start gateways of this test's own: `gateway_factory(limits={...})` returns a started
    GatewayHandle (admin CLI, users, apps); all are stopped at the test's end."""
    factory = GatewayFactory(tmp_path_factory.mktemp, host_keys)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_gateways(
    tmp_path_factory: pytest.TempPathFactory, host_keys: Path
) -> Iterator[GatewayFactory]:
    """gateway_factory for module-scoped fixtures: a module's gateways live until its end."""
    factory = GatewayFactory(tmp_path_factory.mktemp, host_keys)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def admin(server: ServerThread) -> Admin:
    return Admin(server.config_path)


MakeUser = Callable[..., Client]


@pytest.fixture
def make_user(server: ServerThread, admin: Admin, tmp_path: Path) -> MakeUser:
    """Create a registered user with one fresh key and return their client."""

    def make(prefix: str = "user", kind: str = "ed25519", bits: int | None = None) -> Client:
        return helpers.registered_user(server, admin, tmp_path, prefix, kind, bits)

    return make


@pytest.fixture
def owner(make_user: MakeUser) -> Client:
    return make_user("owner")


@pytest.fixture
def app(admin: Admin, owner: Client) -> str:
    """A fresh app owned by `owner`, deploy branch main."""
    name = unique("app")
    admin.ok("app", "create", name, "--owner", owner.name)
    return name
