"""domain/homes.py on the in-memory store: where an app's operations run (here, on another
machine, or nowhere yet), what a forwarded operation may run here, what a drain gives up,
and which machine a new app starts on."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import from_mapping
from gateway.domain.facade import Domain
from gateway.domain.homes import HERE, HomeUnavailable, forwarding
from gateway.models import App
from gateway.store.memory import MemoryStore


def settings(tmp_path: Path, **cluster: object) -> dict[str, object]:
    return {
        "storage": {"database": str(tmp_path / "gw.db"), "repos": str(tmp_path / "repos")},
        "cluster": {"node_name": "host-a", **cluster},
    }


FORWARDING = {"listen": "127.0.0.1:0", "peers": ["127.0.0.1/32"], "forward": "always"}


@pytest.fixture
async def setup(tmp_path: Path) -> tuple[Domain, App, App]:
    store = MemoryStore()
    domain = Domain(from_mapping(settings(tmp_path, **FORWARDING)), store)
    await store.create_user("alice")
    web = await store.create_app("web", "alice", "main")
    api = await store.create_app("api", "alice", "main")
    await store.register_node("a1", "host-a", 1, "10.0.0.11:7422")
    await store.register_node("a2", "host-a", 2, "10.0.0.11:7422")
    await store.register_node("b1", "host-b", 3, "10.0.0.12:7422")
    domain.homes.serve_as("a1")
    return domain, web, api


def test_forwarding_follows_the_setting_and_the_filesystem(tmp_path: Path) -> None:
    assert not forwarding(from_mapping(settings(tmp_path)))  # no listener
    assert forwarding(from_mapping(settings(tmp_path, **FORWARDING)))
    never = {**FORWARDING, "forward": "never"}
    assert not forwarding(from_mapping(settings(tmp_path, **never)))
    # auto: the test's own disk is not a network filesystem.
    auto = {**FORWARDING, "forward": "auto"}
    assert not forwarding(from_mapping(settings(tmp_path, **auto)))


async def test_off_every_operation_runs_here(tmp_path: Path) -> None:
    store = MemoryStore()
    domain = Domain(from_mapping(settings(tmp_path)), store)
    await store.create_user("alice")
    web = await store.create_app("web", "alice", "main")
    assert await domain.homes.route(web) == HERE
    assert await store.home_of(web.id) is None  # nothing claimed


async def test_the_first_node_that_needs_an_app_serves_it(setup) -> None:
    domain, web, _ = setup
    assert await domain.homes.route(web) == HERE
    home = await domain.store.home_of(web.id)
    assert home is not None and home.node == "a1"


async def test_any_worker_of_the_homes_machine_serves_it_directly(setup) -> None:
    domain, web, _ = setup
    await domain.store.claim_home(web.id, "a2")
    assert await domain.homes.route(web) == HERE
    assert await domain.homes.serves_here(web)


async def test_another_machines_app_is_forwarded_there(setup) -> None:
    domain, web, _ = setup
    await domain.store.claim_home(web.id, "b1")
    route = await domain.homes.route(web)
    assert route.home is not None and (route.home.name, route.home.address) == (
        "host-b",
        "10.0.0.12:7422",
    )
    assert not await domain.homes.serves_here(web)


async def test_a_node_declared_gone_takes_no_home(setup) -> None:
    domain, web, _ = setup
    await domain.store.leave_node("a1")
    with pytest.raises(HomeUnavailable):
        await domain.homes.route(web)


async def test_a_drain_keeps_the_homes_of_busy_apps_and_takes_no_new_one(setup) -> None:
    domain, web, api = setup
    await domain.homes.route(web)
    await domain.homes.route(api)
    with domain.homes.busy(web.id):
        assert await domain.homes.release() == 1
        assert await domain.store.homes_of("a1") == [web.id]
        # Forwarded to a draining node: served only where it still is home.
        assert await domain.homes.serves_here(web)
        assert not await domain.homes.serves_here(api)
        assert await domain.store.home_of(api.id) is None


async def test_a_new_app_starts_on_the_machine_that_created_it(setup, tmp_path: Path) -> None:
    domain, _, _ = setup
    created = await domain.apps.create_app("shop", "alice", actor="alice")
    home = await domain.store.home_of(created.id)
    assert home is not None and home.node == "a1"
    # The CLI has no node row of its own: a node of its machine's name takes it.
    cli = Domain(from_mapping(settings(tmp_path, **FORWARDING)), domain.store)
    other = await cli.apps.create_app("blog", "alice", actor="alice")
    home = await domain.store.home_of(other.id)
    assert home is not None and home.name == "host-a"


async def test_a_busy_app_kept_by_a_drain_goes_when_its_last_operation_ends(setup) -> None:
    domain, web, _ = setup
    await domain.homes.route(web)
    with domain.homes.busy(web.id):
        await domain.homes.release()
        with domain.homes.busy(web.id):
            pass
        await domain.homes.finished(web.id)  # one more still runs
        assert await domain.store.homes_of("a1") == [web.id]
    await domain.homes.finished(web.id)
    assert await domain.store.homes_of("a1") == []


async def test_a_drain_hands_over_only_what_it_holds(setup, monkeypatch) -> None:
    domain, web, _ = setup
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("gateway.domain.homes.asyncio.sleep", sleep)
    await domain.homes.hand_over(5.0)
    assert slept == []  # no home: nothing to wait for
    await domain.homes.route(web)
    await domain.homes.hand_over(-1.0)
    await domain.homes.hand_over(5.0)
    assert slept == [5.0]
