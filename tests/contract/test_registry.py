"""Multi-step registry changes are one transaction on every backend."""

from __future__ import annotations

import json

import pytest

from gateway.config import from_mapping
from gateway.domain.facade import Domain
from gateway.errors import Conflict, NotFound
from gateway.store import Store


@pytest.fixture
def domain(store: Store) -> Domain:
    return Domain(from_mapping({}), store)


async def test_a_key_moves_to_another_account(domain: Domain, pubkeys) -> None:
    await domain.accounts.create_user("alice", actor="op")
    await domain.accounts.create_user("bob", actor="op")
    key = await domain.accounts.add_key("alice", "laptop", pubkeys[0], actor="op")
    moved = await domain.accounts.move_key("alice", "laptop", "bob", "work", actor="op")
    assert (moved.user_name, moved.name, moved.fingerprint) == ("bob", "work", key.fingerprint)
    assert await domain.accounts.list_keys("alice") == []
    assert [k.name for k in await domain.accounts.list_keys("bob")] == ["work"]
    found = await domain.store.find_key(key.fingerprint)
    assert found is not None and found.user_name == "bob"
    [event] = [e for e in await domain.store.list_audit() if e.event == "key_moved"]
    assert json.loads(event.detail) == {
        "key": "laptop",
        "to_key": "work",
        "to_user": "bob",
        "user": "alice",
    }


@pytest.mark.parametrize("problem", ["no such user", "name taken"])
async def test_regression_a_refused_move_leaves_the_key_where_it_was(
    domain: Domain, pubkeys, problem: str
) -> None:
    """The key is removed from one account and added to the other in one transaction: when
    the second step is refused, the first is undone (the key never ends up on no account)."""
    await domain.accounts.create_user("alice", actor="op")
    key = await domain.accounts.add_key("alice", "laptop", pubkeys[0], actor="op")
    target = "ghost"
    if problem == "name taken":
        target = "bob"
        await domain.accounts.create_user("bob", actor="op")
        await domain.accounts.add_key("bob", "laptop", pubkeys[1], actor="op")
    with pytest.raises(NotFound if problem == "no such user" else Conflict):
        await domain.accounts.move_key("alice", "laptop", target, actor="op")
    [kept] = await domain.accounts.list_keys("alice")
    assert kept.fingerprint == key.fingerprint and kept.id == key.id
    assert not [e for e in await domain.store.list_audit() if e.event == "key_moved"]
