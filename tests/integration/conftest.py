"""The integration tier: a real Gateway started in the test's own event loop (port 0, a real
SQLite file and repositories under tmp_path) and asyncssh clients whose keys the test makes;
no OpenSSH client, and git only where a test builds a pack."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway import config as gwconfig
from gateway.app import Gateway
from gateway.ssh import hostkeys
from gateway.store import open_store
from tests.helpers import Admin, unique, write_config

# Every session of these tests is bounded: a gateway that stops answering fails the test.
TIMEOUT = 10


@dataclass
class Prepared:
    """What every test gateway starts from, made once per session: its host keys (an RSA
    3072 key takes a while to make, and 0.2 s to load) and an empty registry database
    with every migration applied."""

    host_key_dir: Path
    host_keys: list[asyncssh.SSHKey]
    database: Path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    directory = tmp_path_factory.mktemp("prepared")
    keys = hostkeys.load_or_create(directory / "hostkeys")
    database = directory / "gw.db"

    async def migrate() -> None:
        await (await open_store(database)).close()

    asyncio.run(migrate())
    return Prepared(directory / "hostkeys", keys, database)


@dataclass
class Person:
    """A registered user and the asyncssh key they log in with."""

    name: str
    key: asyncssh.SSHKey
    key_name: str = "laptop"

    @property
    def fingerprint(self) -> str:
        return str(self.key.get_fingerprint("sha256"))


@dataclass
class Reply:
    """What one SSH command answered: exit status and both streams, as text."""

    code: int | None
    stdout: str
    stderr: str


class LiveGateway:
    """One started in-process gateway and what tests do with it: the operator CLI (run in a
    thread, as it runs its own event loop), users with fresh keys, apps, SSH sessions."""

    def __init__(self, gateway: Gateway, config_path: Path, home: Path) -> None:
        self.gateway = gateway
        self.config_path = config_path
        self.home = home
        self.cli = Admin(config_path)

    @property
    def port(self) -> int:
        return self.gateway.port

    def repo(self, app: str) -> Path:
        return self.gateway.config.storage.repos / f"{app}.git"

    async def admin(self, *args: str) -> str:
        """The operator CLI's output; fails the test unless it exits 0."""
        return await asyncio.to_thread(self.cli.ok, *args)

    async def admin_call(self, *args: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(self.cli, *args)

    def public_key_file(self, key: asyncssh.SSHKey, name: str) -> Path:
        path = self.home / f"{name}.pub"
        path.write_bytes(key.export_public_key("openssh"))
        return path

    async def user(self, prefix: str = "user") -> Person:
        """A new user with one fresh ed25519 key named laptop."""
        person = Person(unique(prefix), asyncssh.generate_private_key("ssh-ed25519"))
        await self.admin("user", "add", person.name)
        pub = self.public_key_file(person.key, person.name)
        await self.admin("key", "add", person.name, person.key_name, str(pub))
        return person

    async def app(self, owner: Person, prefix: str = "app") -> str:
        name = unique(prefix)
        await self.admin("app", "create", name, "--owner", owner.name)
        return name

    def connect(self, *keys: asyncssh.SSHKey, **options: Any) -> Any:
        """An asyncssh connection as user git offering exactly these keys, in this order."""
        settings: dict[str, Any] = {
            "username": "git",
            "client_keys": list(keys) or None,
            "known_hosts": None,
            "agent_path": None,
            "config": None,
            "login_timeout": TIMEOUT,
        }
        settings.update(options)
        return asyncssh.connect("127.0.0.1", self.port, **settings)

    async def run(
        self, person: Person | asyncssh.SSHKey, command: str | None, stdin: str = ""
    ) -> Reply:
        """Log in with this person's key, run one command, and return its reply."""
        key = person.key if isinstance(person, Person) else person
        async with self.connect(key) as conn:
            result = await asyncio.wait_for(
                conn.run(command, input=stdin.encode(), encoding=None), TIMEOUT
            )
        return Reply(
            result.exit_status, (result.stdout or b"").decode(), (result.stderr or b"").decode()
        )

    async def reload(self, **sections: dict[str, object]) -> None:
        """With overrides, rewrite the config file with them (as the test's gateway was
        written); then reload as SIGHUP does, and wait until the reload is over."""
        if sections:
            assert write_config(self.home, **self.overrides_with(sections)) == self.config_path
        before = set(self.gateway._background)
        self.gateway.reload()
        started = set(self.gateway._background) - before
        await asyncio.wait_for(asyncio.gather(*started), TIMEOUT)

    overrides: dict[str, dict[str, object]]

    def overrides_with(self, more: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        merged = {name: dict(values) for name, values in self.overrides.items()}
        for name, values in more.items():
            merged.setdefault(name, {}).update(values)
        self.overrides = merged
        return merged


StartGateway = Callable[..., Awaitable[LiveGateway]]


@pytest.fixture
async def start_gateway(
    tmp_path: Path, prepared: Prepared, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartGateway]:
    """Start gateways in this test's loop: `await start_gateway(limits={...})`; each one is
    closed at the test's end. They start from the session's prepared host keys and database
    (loading the keys is what the end-to-end tests prove)."""
    started: list[LiveGateway] = []
    monkeypatch.setattr(hostkeys, "load_or_create", lambda directory: list(prepared.host_keys))

    async def start(**overrides: dict[str, object]) -> LiveGateway:
        home = tmp_path / unique("gw")
        home.mkdir()
        shutil.copytree(prepared.host_key_dir, home / "hostkeys")
        shutil.copy(prepared.database, home / "gw.db")
        path = write_config(home, **overrides)
        gateway = Gateway(gwconfig.load(path))
        await gateway.start()
        live = LiveGateway(gateway, path, home)
        live.overrides = {name: dict(values) for name, values in overrides.items()}
        started.append(live)
        return live

    try:
        yield start
    finally:
        for live in reversed(started):
            await live.gateway.close()


@pytest.fixture
async def gw(start_gateway: StartGateway) -> LiveGateway:
    """A gateway with the default test settings."""
    return await start_gateway()
