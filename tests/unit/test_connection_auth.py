"""ssh/connection.py's authentication decisions, with a real SQLite registry and fakes for
the gateway and asyncssh's connection: which key becomes the identity, what is refused, why
the client is told, what the operator's counters say."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway import config as gwconfig
from gateway.domain.facade import Domain
from gateway.errors import StoreUnavailable
from gateway.keys import parse_public_key
from gateway.metrics import Metrics
from gateway.ssh import certs
from gateway.ssh.connection import NO_AUTH, Connection
from gateway.ssh.explain import Explainer
from gateway.ssh.limits import Admission
from gateway.store import Store, open_store, utcnow
from tests.helpers import write_config


def public_text(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode()


class FakeConn:
    """The few asyncssh SSHServerConnection calls a Connection makes while authenticating."""

    def __init__(self) -> None:
        self.banners: list[str] = []
        self.extra: dict[str, Any] = {"recv_cipher": "aes128-ctr", "recv_mac": "hmac-sha2-256"}
        self.aborted = False
        self.closed = False

    def send_auth_banner(self, text: str) -> None:
        self.banners.append(text)

    def set_extra_info(self, **info: Any) -> None:
        self.extra.update(info)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class FakeHost:
    """What Connection needs of the gateway (connection.Host), with a real config and store."""

    def __init__(self, config: gwconfig.Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.metrics = Metrics()
        self.admission = Admission(config.limits)
        self.explainer = Explainer("", config.ssh.user, lambda: "ssh git@gateway.example")
        self.connections: set[Connection] = set()
        self.cert_cas = certs.TrustedCAs(None)
        self.revocations = certs.Revocations(None)
        self.first_algorithms = ("", "")
        self.domain = Domain(config, store)

    async def handle_process(self, process: Any) -> None:  # pragma: no cover - no sessions
        raise AssertionError("no session in these tests")

    def refresh_certificate_lists(self) -> None:
        pass


@pytest.fixture
async def host(tmp_path: Path):
    config = gwconfig.load(write_config(tmp_path, limits={"max_auth_attempts": 3}))
    store = await open_store(tmp_path / "gw.db")
    await store.create_user("alice")
    await store.create_user("mallory")
    try:
        yield FakeHost(config, store)
    finally:
        await store.close()


async def register(host: FakeHost, user: str, name: str = "laptop", **limits) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    await host.store.add_key(user, name, parse_public_key(public_text(key)), **limits)
    return key


def connect(host: FakeHost) -> tuple[Connection, FakeConn]:
    """A Connection as asyncssh leaves it once the TCP connection is set up, before auth."""
    connection = Connection(host, ("192.0.2.7", 40000))
    fake = FakeConn()
    connection.conn = fake  # type: ignore[assignment]
    connection.address, connection.peer = "192.0.2.7", "192.0.2.7:40000"
    return connection, fake


async def test_a_registered_key_becomes_the_identity_only_once_auth_completes(host):
    key = await register(host, "alice")
    connection, fake = connect(host)
    assert await connection.validate_public_key("git", key) is True
    assert connection.identity is None  # a probe or a signature not yet verified
    await connection.auth_completed()
    identity = connection.identity
    assert identity is not None
    assert (identity.user_name, identity.key_name) == ("alice", "laptop")
    assert identity.fingerprint == key.get_fingerprint("sha256")
    assert fake.extra["gateway_identity"] == identity
    [used] = await host.store.list_keys("alice")
    assert used.last_used_at is not None  # the key's "last used", through the facade
    [event] = [e for e in await host.store.list_audit(limit=10) if e.event == "auth_ok"]
    assert event.actor == "alice"


async def test_an_unknown_key_is_refused_and_the_client_told_once(host):
    connection, fake = connect(host)
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    assert await connection.validate_public_key("git", stranger) is False
    assert (connection.failure, connection.failure_kind) == ("unknown key", "unknown_key")
    assert connection.last_fingerprint == stranger.get_fingerprint("sha256")
    assert len(fake.banners) == 1 and "is not registered here" in fake.banners[0]
    assert connection.identity is None


async def test_a_user_other_than_git_is_refused_even_with_a_registered_key(host):
    key = await register(host, "alice")
    connection, fake = connect(host)
    assert await connection.validate_public_key("root", key) is False
    assert connection.failure_kind == "bad_user"
    assert connection.failure == "SSH user 'root' is not accepted"
    assert fake.banners


async def test_too_many_attempts_disconnect(host):
    connection, _ = connect(host)
    limit = host.config.limits.max_auth_attempts
    for _ in range(limit):
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        assert await connection.validate_public_key("git", stranger) is False
    with pytest.raises(asyncssh.PermissionDenied):
        await connection.validate_public_key("git", asyncssh.generate_private_key("ssh-ed25519"))
    assert connection.failure_kind == "too_many_attempts"
    assert connection.auth_attempts == limit + 1


async def test_regression_a_key_accepted_for_a_probe_never_becomes_the_identity(host):
    """The victim's public key is registered, so its probe is answered "go on"; a later
    request that does not complete (an unknown key) leaves no identity behind: authentication
    completing then finds no candidate and closes the connection."""
    victim = await register(host, "alice")
    connection, fake = connect(host)
    assert await connection.validate_public_key("git", victim) is True
    connection._new_request()  # what the possession wrapper does for every new request
    assert (
        await connection.validate_public_key("git", asyncssh.generate_private_key("ssh-ed25519"))
        is False
    )
    await connection.auth_completed()
    assert connection.identity is None and fake.aborted


async def test_regression_the_identity_is_the_last_key_validated(host):
    victim = await register(host, "alice")
    own = await register(host, "mallory")
    connection, _ = connect(host)
    assert await connection.validate_public_key("git", victim) is True
    assert await connection.validate_public_key("git", own) is True
    await connection.auth_completed()
    assert connection.identity is not None and connection.identity.user_name == "mallory"


async def test_an_expired_key_is_refused_and_never_becomes_the_identity(host):
    key = await register(host, "alice", expires_at=utcnow() - timedelta(days=1))
    connection, _ = connect(host)
    # Without the possession wrapper (no asyncssh connection here), the refusal is plain.
    assert not await connection.validate_public_key("git", key)
    assert connection.failure_kind == "expired_key"
    await connection.auth_completed()
    assert connection.identity is None


async def test_a_registry_outage_is_said_rather_than_a_closed_connection(host):
    key = await register(host, "alice")
    connection, _ = connect(host)

    async def down(fingerprint: str) -> None:
        raise StoreUnavailable("the registry database is unavailable")

    host.store.find_key = down  # type: ignore[method-assign]
    with pytest.raises(asyncssh.ServiceNotAvailable):
        await connection.validate_public_key("git", key)
    assert connection.failure_kind == "unavailable"
    assert connection.identity is None


async def test_no_session_channel_before_authentication(host):
    connection, _ = connect(host)
    with pytest.raises(asyncssh.ChannelOpenError):
        connection.session_requested()


async def test_only_public_keys_are_offered(host):
    connection, _ = connect(host)
    assert connection.begin_auth("git") is True
    assert connection.public_key_auth_supported()
    assert not connection.password_auth_supported()
    assert not connection.kbdint_auth_supported()
    assert not connection.host_based_auth_supported()


async def test_a_user_over_their_connection_limit_is_refused_on_every_session(host, tmp_path):
    key = await register(host, "alice")
    host.config = gwconfig.load(
        write_config(tmp_path / "one", limits={"max_connections_per_user": 1})
    )
    first, _ = connect(host)
    second, _ = connect(host)
    for connection in (first, second):
        assert await connection.validate_public_key("git", key)
        await connection.auth_completed()
    assert first.over_limit is None and first.user_held is not None
    assert second.over_limit is not None
    assert second.over_limit.startswith("too many connections for alice (at most 1 at once")


def test_a_connection_that_never_authenticated_says_so(host):
    connection, _ = connect(host)
    assert connection.failure == NO_AUTH and connection.identity is None
