"""Each app's home node, on every backend: one node serves an app's repository at a time,
the first registered node that needs it claims it, and the home moves only when its node
is gone (declared gone, left) or gives its homes up (drain)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import NotFound
from gateway.store import Store
from tests.contract.conftest import Backend
from tests.contract.test_deploy_queue import backdate
from tests.contract.test_store import app_with_owner, new_deploy


async def claim(store: Store, app_id: int, node: str) -> str | None:
    """The home's node id, as claim_home tells it."""
    found = await store.claim_home(app_id, node)
    return None if found is None else found.node


async def home(store: Store, app_id: int) -> str | None:
    found = await store.home_of(app_id)
    return None if found is None else found.node


async def test_the_first_claim_wins_and_the_others_are_told_its_name(store: Store) -> None:
    web = await app_with_owner(store)
    api = await app_with_owner(store, "api")
    await store.register_node("a", "host-a", 1)
    await store.register_node("b", "host-b", 2)
    assert await home(store, web) is None
    assert await claim(store, web, "a") == "a"
    assert await claim(store, web, "b") == "a"
    assert await claim(store, web, "a") == "a"  # claiming again keeps it
    assert await claim(store, api, "b") == "b"
    assert await home(store, web) == "a" and await home(store, api) == "b"
    assert await store.homes_of("a") == [web]
    assert await store.homes_of("b") == [api]
    assert await store.homes_of("nobody") == []
    # Renewing the node is renewing its homes: nothing else to do to keep them.
    assert await store.renew_node("a")
    assert await store.expire_nodes(3600) == []
    assert await store.homes_of("a") == [web]


async def test_racing_claims_agree_on_one_home(backend: Backend) -> None:
    """Eight processes on four connections claim the same apps at once: every claim of an
    app answers the same node, the one the registry keeps."""
    stores = [backend.store] + [await backend.open_another() for _ in range(3)]
    try:
        apps = [await app_with_owner(backend.store, f"app{i}") for i in range(4)]
        for i in range(8):
            await stores[i % 4].register_node(f"p{i}", "host", i)
        for app in apps:
            answers = await asyncio.gather(*(claim(stores[i % 4], app, f"p{i}") for i in range(8)))
            assert len(set(answers)) == 1 and answers[0] is not None, answers
            assert await home(backend.store, app) == answers[0]
        homes = [await home(backend.store, app) for app in apps]
        for i in range(8):
            mine = [app for app, home in zip(apps, homes, strict=True) if home == f"p{i}"]
            assert await backend.store.homes_of(f"p{i}") == mine
    finally:
        for other in stores[1:]:
            await other.close()


async def test_a_home_moves_once_its_node_is_declared_gone(store: Store) -> None:
    web = await app_with_owner(store)
    api = await app_with_owner(store, "api")
    await store.register_node("dead", "host-a", 1)
    await store.register_node("alive", "host-b", 2)
    assert await claim(store, web, "dead") == "dead"
    assert await claim(store, api, "dead") == "dead"
    await backdate(store, "dead")
    # Not yet declared gone: its homes hold (the sweep decides, as it does for deploys).
    assert await claim(store, web, "alive") == "dead"
    await store.expire_nodes(60)
    assert await home(store, web) is None and await home(store, api) is None
    assert await store.homes_of("dead") == []
    assert await claim(store, web, "alive") == "alive"
    assert await store.homes_of("alive") == [web]


async def test_a_node_that_leaves_frees_its_homes(store: Store) -> None:
    web = await app_with_owner(store)
    await store.register_node("a", "host-a", 1)
    await store.register_node("b", "host-b", 2)
    assert await claim(store, web, "a") == "a"
    await store.leave_node("a")
    assert await home(store, web) is None
    assert await claim(store, web, "b") == "b"


async def test_a_drain_releases_the_nodes_homes_and_only_them(store: Store) -> None:
    apps = [await app_with_owner(store, f"app{i}") for i in range(3)]
    await store.register_node("draining", "host-a", 1)
    await store.register_node("staying", "host-b", 2)
    for app in apps[:2]:
        assert await claim(store, app, "draining") == "draining"
    assert await claim(store, apps[2], "staying") == "staying"
    assert await store.release_homes("draining") == 2
    assert await store.release_homes("draining") == 0
    assert await store.homes_of("draining") == []
    assert [await home(store, app) for app in apps] == [None, None, "staying"]
    assert await claim(store, apps[0], "staying") == "staying"
    # The node itself stays registered until it leaves (it may finish what it runs).
    assert {n.id for n in await store.list_nodes()} == {"draining", "staying"}


async def test_removing_an_app_removes_its_home(store: Store) -> None:
    web = await app_with_owner(store)
    api = await app_with_owner(store, "api")
    await store.register_node("a", "host-a", 1)
    assert await claim(store, web, "a") == "a"
    assert await claim(store, api, "a") == "a"
    await store.remove_app("web")
    assert await home(store, web) is None
    assert await store.homes_of("a") == [api]
    with pytest.raises(NotFound, match=rf"^no such app \(id {web}\)$"):
        await claim(store, web, "a")
    # The same name again is a new app (a new id) with no home yet.
    again = await app_with_owner(store)
    assert again != web and await home(store, again) is None


async def test_regression_a_node_that_is_not_registered_takes_no_home(store: Store) -> None:
    """A node declared gone (or never registered) must not take an app: its homes would
    never be freed, since nothing expires a node the registry does not list. It is told
    the current home if there is one, else None (it joins again first)."""
    web = await app_with_owner(store)
    api = await app_with_owner(store, "api")
    await store.register_node("a", "host-a", 1)
    await store.register_node("gone", "host-b", 2)
    await backdate(store, "gone")
    await store.expire_nodes(60)
    assert await claim(store, web, "gone") is None
    assert await claim(store, web, "never-registered") is None
    assert await home(store, web) is None
    assert await claim(store, api, "a") == "a"
    assert await claim(store, api, "gone") == "a"
    assert await store.homes_of("gone") == [] and await store.homes_of("never-registered") == []
    with pytest.raises(NotFound):
        await claim(store, 999_999, "a")
    # Joining again brings back none of what it held before it was declared gone.
    await store.register_node("gone", "host-b", 2)
    assert await store.homes_of("gone") == []
    assert await claim(store, web, "gone") == "gone"


async def test_regression_a_home_never_outlives_its_node_in_a_race(backend: Backend) -> None:
    """Claims by a node race the sweep that declares it gone (and, on another connection,
    claims by a live node): whichever wins, no app is left homed on the dead node, and
    every app is free for a live node to take."""
    other = await backend.open_another()
    try:
        apps = [await app_with_owner(backend.store, f"app{i}") for i in range(16)]
        await backend.store.register_node("alive", "host-a", 1)
        await other.register_node("dying", "host-b", 2)
        await backdate(backend.store, "dying")
        await asyncio.gather(
            *(claim(other, app, "dying") for app in apps),
            backend.store.expire_nodes(60),
            *(claim(backend.store, app, "alive") for app in apps[::2]),
        )
        assert await backend.store.homes_of("dying") == []
        for app in apps:
            assert await home(backend.store, app) in (None, "alive")
        for app in apps:
            assert await claim(backend.store, app, "alive") == "alive"
    finally:
        await other.close()


async def test_regression_a_drain_cannot_release_another_nodes_homes(store: Store) -> None:
    web = await app_with_owner(store)
    await store.register_node("a", "host-a", 1)
    assert await claim(store, web, "a") == "a"
    for name in ("b", "", "%", "a%", "A", "a "):
        assert await store.release_homes(name) == 0
    assert await home(store, web) == "a"


async def test_a_home_names_its_node_and_where_the_others_reach_it(store: Store) -> None:
    web = await app_with_owner(store)
    await store.register_node("a", "host-a", 1, "10.0.0.11:7422")
    await store.register_node("b", "host-b", 2)
    found = await store.claim_home(web, "a")
    assert found is not None and (found.node, found.name, found.address) == (
        "a",
        "host-a",
        "10.0.0.11:7422",
    )
    assert await store.home_of(web) == found
    assert [(n.id, n.address) for n in await store.list_nodes()] == [
        ("a", "10.0.0.11:7422"),
        ("b", None),
    ]


async def test_a_drain_may_keep_the_homes_of_apps_still_busy(store: Store) -> None:
    apps = [await app_with_owner(store, f"app{i}") for i in range(3)]
    await store.register_node("draining", "host-a", 1)
    for app in apps:
        await store.claim_home(app, "draining")
    assert await store.release_homes("draining", [apps[0], apps[2]]) == 2
    assert await store.release_homes("draining", []) == 0
    assert await store.homes_of("draining") == [apps[1]]


async def test_a_deploy_runs_on_its_apps_home_machine(store: Store) -> None:
    """Only the home's filesystem cache reads a repository: its deploys (the export reads
    it) are claimed by a process of the home's machine, any of its workers."""
    web = await app_with_owner(store)
    await store.register_node("a1", "host-a", 1)
    await store.register_node("a2", "host-a", 2)
    await store.register_node("b1", "host-b", 3)
    await store.claim_home(web, "a1")
    queued = await store.queue_deploy(new_deploy(web))
    assert await store.claim_deploy("b1", "host-b", 4) is None
    taken = await store.claim_deploy("a2", "host-a", 4)
    assert taken is not None and taken.id == queued.deploy.id
