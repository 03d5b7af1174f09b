"""The node-wide connection counts that `serve --workers N` shares between its workers."""

from __future__ import annotations

import os

from gateway import config
from gateway.shared_limits import SharedCounts
from gateway.ssh.limits import Admission


def two_workers(**limits: int) -> tuple[SharedCounts, Admission, Admission]:
    table = SharedCounts.create(2, max_connections=limits.get("max_connections", 1000))
    settings = config.from_mapping({"limits": limits}).limits
    a = Admission(settings, shared=SharedCounts(table.fd, region=0))
    b = Admission(settings, shared=SharedCounts(table.fd, region=1))
    return table, a, b


def test_per_address_cap_counts_every_worker() -> None:
    table, a, b = two_workers(max_connections_per_address=3)
    assert [a.admit("10.0.0.1"), a.admit("10.0.0.1")] == [None, None]
    assert b.admit("10.0.0.1") is None
    # Worker b holds one, worker a two: the address is at its cap on both.
    assert b.admit("10.0.0.1") == "max_connections_per_address"
    assert a.admit("10.0.0.1") == "max_connections_per_address"
    assert b.admit("10.0.0.2") is None  # another address is not affected
    a.release("10.0.0.1", authenticated=False)
    assert b.admit("10.0.0.1") is None
    os.close(table.fd)


def test_totals_and_unauthenticated_count_every_worker() -> None:
    table, a, b = two_workers(max_connections=3, max_unauthenticated=2)
    assert a.admit("10.0.0.1") is None
    assert b.admit("10.0.0.2") is None
    assert a.admit("10.0.0.3") == "max_unauthenticated"
    b.authenticated()
    assert a.admit("10.0.0.3") is None
    assert b.admit("10.0.0.4") == "max_connections"
    assert table.totals() == (3, 2)
    os.close(table.fd)


def test_a_dead_workers_counts_are_cleared() -> None:
    table, a, b = two_workers(max_connections_per_address=2)
    assert a.admit("10.0.0.1") is None and a.admit("10.0.0.1") is None
    assert b.admit("10.0.0.1") == "max_connections_per_address"
    table.clear(0)  # what the supervisor does when worker 0 dies
    assert b.admit("10.0.0.1") is None
    assert table.totals() == (1, 1)
    os.close(table.fd)


def test_many_addresses_coming_and_going_never_fill_the_table() -> None:
    table, a, _ = two_workers(max_connections=20)
    for round_number in range(50):  # 1,000 distinct addresses through a 104-slot region
        addresses = [f"10.{round_number}.0.{i}" for i in range(20)]
        for address in addresses:
            assert a.admit(address) is None
        assert a.admit("192.0.2.1") == "max_connections"
        for address in addresses:
            a.release(address, authenticated=False)
        assert table.totals() == (0, 0)
    os.close(table.fd)


def test_a_users_connections_and_fetches_count_every_worker() -> None:
    """[limits] max_connections_per_user and max_fetches_per_user hold for the node: a
    user's count on one worker is seen by the others, apart from addresses and each other."""
    from gateway.ssh.limits import CONNECTIONS, FETCHES

    table, a, b = two_workers()
    assert a.hold(CONNECTIONS, "user:1", 2) and b.hold(CONNECTIONS, "user:1", 2)
    assert not a.hold(CONNECTIONS, "user:1", 2) and not b.hold(CONNECTIONS, "user:1", 2)
    assert b.hold(CONNECTIONS, "user:2", 2)  # another user is not affected
    assert a.hold(FETCHES, "user:1", 1)  # fetches are counted on their own
    assert not b.hold(FETCHES, "user:1", 1)
    assert a.admit("10.0.0.1") is None  # and so are addresses
    b.give_back(CONNECTIONS, "user:1")
    assert a.hold(CONNECTIONS, "user:1", 2)
    a.give_back(FETCHES, "user:1")
    assert b.hold(FETCHES, "user:1", 1)
    table.clear(1)  # worker b died: what it held is forgotten
    assert b.hold(CONNECTIONS, "user:1", 2) is False  # a still holds two
    assert a.hold(FETCHES, "user:1", 1)
    os.close(table.fd)
