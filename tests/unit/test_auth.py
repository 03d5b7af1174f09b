"""authorize(): a reader who pushes is told what is missing; anyone else learns nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.domain.access import authorize, identify
from gateway.errors import AccessDenied, GatewayError
from gateway.keys import parse_public_key
from gateway.models import Identity, Role
from gateway.store import Store, open_store
from tests.helpers import keygen

NOT_FOUND = "repository '{}' not found or access denied"


@pytest.fixture(scope="module")
def pubkeys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("authkeys")
    return [Path(f"{keygen(d / f'k{i}', 'ed25519')}.pub").read_text() for i in range(4)]


@pytest.fixture
async def store(tmp_path: Path):
    store = await open_store(tmp_path / "gw.db")
    await store.create_user("alice")
    await store.create_user("bob")
    await store.create_app("myapp", "alice", "main")
    await store.create_app("secret", "alice", "main")
    await store.grant("myapp", "bob", Role.READ)
    try:
        yield store
    finally:
        await store.close()


async def who(store: Store, user: str, name: str, text: str, **limits) -> Identity:
    key = await store.add_key(user, name, parse_public_key(text), **limits)
    identity = await identify(store, key.fingerprint)
    assert identity is not None
    return identity


async def refusal(store: Store, identity: Identity, app: str, role: Role) -> str:
    with pytest.raises(GatewayError) as err:
        await authorize(store, identity, app, role)
    return str(err.value)


async def test_a_reader_who_pushes_is_told_it_needs_the_write_role(store, pubkeys):
    bob = await who(store, "bob", "laptop", pubkeys[0])
    app, role = await authorize(store, bob, "myapp", Role.READ)
    assert (app.name, role) == ("myapp", Role.READ)
    assert await refusal(store, bob, "myapp", Role.WRITE) == (
        "you have read access to 'myapp': pushing needs the write role; ask its owner or an admin"
    )


async def test_regression_a_non_member_learns_nothing_about_existing_apps(store, pubkeys):
    """Pushing to an app one cannot read, or to no app, gives the same words as ever."""
    bob = await who(store, "bob", "laptop", pubkeys[0])
    for name in ("secret", "no-such-app", "../etc"):
        for needed in (Role.READ, Role.WRITE):
            with pytest.raises(AccessDenied) as err:
                await authorize(store, bob, name, needed)
            assert str(err.value) == NOT_FOUND.format(name)


async def test_a_read_only_key_of_a_writer_says_the_key_is_read_only(store, pubkeys):
    ro = await who(store, "alice", "ci", pubkeys[1], access="read")
    assert await refusal(store, ro, "myapp", Role.WRITE) == (
        'the SSH key "ci" of alice is read-only: it cannot push '
        "(use a key added without --read-only)"
    )


async def test_regression_a_scoped_key_learns_nothing_about_apps_outside_its_scope(store, pubkeys):
    scoped = await who(store, "alice", "ci", pubkeys[2], access="read", scope=["myapp"])
    assert "read-only" in await refusal(store, scoped, "myapp", Role.WRITE)
    for name in ("secret", "no-such-app"):
        assert await refusal(store, scoped, name, Role.WRITE) == NOT_FOUND.format(name)


async def test_a_read_only_key_of_a_reader_names_the_missing_role(store, pubkeys):
    """The key is not what stops bob: another key would not help, the write role would."""
    ro = await who(store, "bob", "ro", pubkeys[3], access="read")
    assert "pushing needs the write role" in await refusal(store, ro, "myapp", Role.WRITE)
