"""The shared deploy queue, its leases and its logs, on every backend: what several gateway
processes (here: several stores on one registry) rely on."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.models import DeployStatus
from gateway.store import Store, open_store
from gateway.times import parse as at
from tests.contract.conftest import Backend
from tests.contract.test_store import app_with_owner, new_deploy


async def test_a_newer_push_supersedes_what_waits_not_what_runs(store: Store) -> None:
    app = await app_with_owner(store)
    other = await app_with_owner(store, "api")
    first = (await store.queue_deploy(new_deploy(app))).deploy
    await store.register_node("n1", "host-a", 1)
    assert (await store.claim_deploy("n1", "host-a", 4)).id == first.id
    second = await store.queue_deploy(new_deploy(app))
    elsewhere = await store.queue_deploy(new_deploy(other))
    third = await store.queue_deploy(new_deploy(app))
    assert second.superseded == [] and elsewhere.superseded == []
    assert third.superseded == [second.deploy.id]
    cancelled = await store.get_deploy(second.deploy.id)
    assert cancelled.status is DeployStatus.CANCELLED
    assert cancelled.superseded_by == third.deploy.id
    assert cancelled.reason == f"superseded by #{third.deploy.id}"
    assert (await store.get_deploy(first.id)).status is DeployStatus.RUNNING
    assert (await store.get_deploy(elsewhere.deploy.id)).status is DeployStatus.QUEUED


async def test_queue_stats_count_what_waits_and_since_when(store: Store) -> None:
    assert await store.queue_stats() == (0, None)
    app = await app_with_owner(store)
    other = await app_with_owner(store, "api")
    first = (await store.queue_deploy(new_deploy(app))).deploy
    await store.queue_deploy(new_deploy(other))
    count, oldest = await store.queue_stats()
    assert count == 2 and oldest == first.created_at
    await store.register_node("n1", "host-a", 1)
    await store.claim_deploy("n1", "host-a", 4)
    assert (await store.queue_stats())[0] == 1


async def test_claims_one_per_app_oldest_first_within_the_node_limit(store: Store) -> None:
    web, api, docs = [await app_with_owner(store, name) for name in ("web", "api", "docs")]
    await store.register_node("a1", "host-a", 1)
    await store.register_node("a2", "host-a", 2)
    await store.register_node("b1", "host-b", 3)
    w1 = (await store.queue_deploy(new_deploy(web))).deploy
    a1 = (await store.queue_deploy(new_deploy(api))).deploy
    d1 = (await store.queue_deploy(new_deploy(docs))).deploy
    claimed = await store.claim_deploy("a1", "host-a", 2)
    assert (claimed.id, claimed.status, claimed.runner) == (w1.id, DeployStatus.RUNNING, "a1")
    w2 = (await store.queue_deploy(new_deploy(web))).deploy  # web runs: w2 waits for it
    assert (await store.claim_deploy("a2", "host-a", 2)).id == a1.id
    # host-a runs two already (its two processes count together): no third there.
    assert await store.claim_deploy("a1", "host-a", 2) is None
    assert (await store.claim_deploy("b1", "host-b", 2)).id == d1.id
    assert await store.claim_deploy("b1", "host-b", 2) is None  # w2's app still runs w1
    await store.finish_deploy(w1.id, DeployStatus.SUCCEEDED, at("2026-01-01T00:00:00Z"))
    assert (await store.claim_deploy("b1", "host-b", 2)).id == w2.id


async def test_a_gated_deploy_runs_only_where_its_push_waits(store: Store) -> None:
    app = await app_with_owner(store)
    await store.register_node("holder", "host-a", 1)
    await store.register_node("other", "host-b", 2)
    gated = dataclasses.replace(new_deploy(app), mode="gate")
    deploy = (await store.queue_deploy(gated, origin="holder")).deploy
    assert await store.claim_deploy("other", "host-b", 4) is None
    assert (await store.claim_deploy("holder", "host-a", 4)).id == deploy.id


async def test_concurrent_claims_never_run_two_deploys_of_one_app(backend: Backend) -> None:
    """Eight processes claim at once, again and again: each app runs one deploy at a time
    and each node name stays within its limit, whatever the interleaving."""
    stores = [backend.store] + [await backend.open_another() for _ in range(3)]
    try:
        apps = [await app_with_owner(backend.store, f"app{i}") for i in range(3)]
        for i in range(8):
            await stores[i % 4].register_node(f"p{i}", f"host{i % 2}", i)
        for _ in range(5):
            for app in apps:
                for _ in range(2):
                    await backend.store.create_deploy(new_deploy(app))
            claims = await asyncio.gather(
                *(stores[i % 4].claim_deploy(f"p{i}", f"host{i % 2}", 2) for i in range(8))
            )
            taken = [d for d in claims if d is not None]
            # A claim that lost a race takes nothing rather than a second deploy of one app.
            assert 1 <= len(taken) == len({d.app_id for d in taken}) <= len(apps)
            running = await backend.store.deploys_in((DeployStatus.RUNNING,))
            assert len({d.app_id for d in running}) == len(running)
            for name in ("host0", "host1"):
                assert sum(1 for d in running if int(d.runner[1:]) % 2 == int(name[-1])) <= 2
            for deploy in running:
                await backend.store.finish_deploy(
                    deploy.id, DeployStatus.SUCCEEDED, at("2026-01-01T00:00:00Z")
                )
            for deploy in await backend.store.deploys_in((DeployStatus.QUEUED,)):
                await backend.store.finish_deploy(
                    deploy.id, DeployStatus.CANCELLED, at("2026-01-01T00:00:00Z")
                )
    finally:
        for other in stores[1:]:
            await other.close()


async def test_cancel_a_queued_deploy_at_once_a_running_one_through_its_runner(
    store: Store,
) -> None:
    app = await app_with_owner(store)
    await store.register_node("n1", "host", 1)
    running = (await store.queue_deploy(new_deploy(app))).deploy
    await store.claim_deploy("n1", "host", 4)
    waiting = (await store.queue_deploy(new_deploy(app))).deploy
    after = await store.request_cancel(waiting.id, "cancelled by bob")
    assert (after.status, after.reason) == (DeployStatus.CANCELLED, "cancelled by bob")
    after = await store.request_cancel(running.id, "cancelled by bob")
    assert after.status is DeployStatus.RUNNING  # its runner stops it
    assert await store.cancel_requests("n1") == [(running.id, "cancelled by bob")]
    assert await store.cancel_requests("n2") == []
    await store.finish_deploy(running.id, DeployStatus.CANCELLED, at("2026-01-01T00:00:00Z"))
    assert await store.cancel_requests("n1") == []
    assert await store.request_cancel(999_999, "x") is None


async def test_a_receivers_report_counts_once_and_only_while_running(store: Store) -> None:
    app = await app_with_owner(store)
    await store.register_node("n1", "host", 1)
    deploy = (await store.queue_deploy(new_deploy(app))).deploy
    assert not await store.report_deploy(deploy.id, DeployStatus.SUCCEEDED, None)  # queued
    await store.claim_deploy("n1", "host", 4)
    assert await store.deploy_report(deploy.id) is None
    assert await store.report_deploy(deploy.id, DeployStatus.FAILED, 3)
    assert not await store.report_deploy(deploy.id, DeployStatus.SUCCEEDED, 0)
    assert await store.deploy_report(deploy.id) == (DeployStatus.FAILED, 3)


async def test_log_chunks_are_numbered_placed_and_trimmed_to_the_tail(store: Store) -> None:
    app = await app_with_owner(store)
    deploy = (await store.queue_deploy(new_deploy(app))).deploy
    assert await store.append_deploy_log(deploy.id, "héllo\n", keep=100) == 1
    assert await store.append_deploy_log(deploy.id, "x" * 50, skipped=10, keep=100) == 2
    chunks = await store.deploy_log(deploy.id)
    assert [(c.seq, c.position, c.size) for c in chunks] == [(1, 0, 7), (2, 17, 50)]
    await store.append_deploy_log(deploy.id, "y" * 60, keep=100)
    # Whole chunks before the last 100 bytes go; the one straddling the cut stays.
    assert [c.seq for c in await store.deploy_log(deploy.id)] == [2, 3]
    await store.append_deploy_log(deploy.id, "z" * 500, keep=100)
    assert [c.seq for c in await store.deploy_log(deploy.id)] == [4]  # the newest stays
    await store.append_deploy_log(deploy.id, "end\n", closing=True, keep=1000)
    last = await store.deploy_log(deploy.id, after=4)
    assert [(c.seq, c.position, c.closing, c.text) for c in last] == [(5, 627, True, "end\n")]
    assert [c.seq for c in await store.deploy_log(deploy.id, limit=1)] == [4]
    assert await store.append_deploy_log(999_999, "x", keep=10) is None


async def test_a_process_that_stops_renewing_is_declared_gone(store: Store) -> None:
    app = await app_with_owner(store)
    api = await app_with_owner(store, "api")
    docs = await app_with_owner(store, "docs")
    await store.register_node("dead", "host-a", 1)
    await store.register_node("alive", "host-b", 2)
    ran = (await store.queue_deploy(new_deploy(app))).deploy
    await store.claim_deploy("dead", "host-a", 4)
    held = (
        await store.queue_deploy(dataclasses.replace(new_deploy(api), mode="gate"), origin="dead")
    ).deploy
    waits = (await store.queue_deploy(new_deploy(docs))).deploy
    assert await store.expire_nodes(3600) == []  # everyone renewed within the hour
    assert await store.renew_node("alive")
    assert {n.id for n in await store.list_nodes()} == {"dead", "alive"}
    # "dead" stopped renewing: made visible here by a lapse that "alive" just beat.
    await backdate(store, "dead")
    gone = await store.expire_nodes(60)
    assert [d.id for d in gone] == [ran.id, held.id]
    assert all(d.status is DeployStatus.INTERRUPTED for d in gone)
    assert gone[0].reason == "the gateway running it stopped answering"
    assert gone[1].reason == "the gated push was lost with the gateway holding it"
    assert (await store.get_deploy(waits.id)).status is DeployStatus.QUEUED  # anyone runs it
    assert [n.id for n in await store.list_nodes()] == ["alive"]
    assert not await store.renew_node("dead")  # it learns it was declared gone
    await store.leave_node("alive")
    assert await store.list_nodes() == []


async def backdate(store: Store, node: str) -> None:
    """Make a node's last renewal two minutes old, as if it had stopped then."""
    from gateway.store.memory import MemoryStore
    from gateway.store.sql import SQLStore

    if isinstance(store, MemoryStore):
        async with store.transaction():
            store._db.nodes[node]["seen_at"] -= 120
    else:
        assert isinstance(store, SQLStore)
        await store.execute("UPDATE nodes SET seen_at = seen_at - 120 WHERE id = $1", node)


async def test_changes_are_announced_to_subscribers(store: Store) -> None:
    heard: list[tuple[str, int]] = []
    store.subscribe(lambda kind, deploy_id: heard.append((kind, deploy_id)))
    app = await app_with_owner(store)
    await store.register_node("n1", "host", 1)
    first = (await store.queue_deploy(new_deploy(app))).deploy
    second = (await store.queue_deploy(new_deploy(app))).deploy
    await store.claim_deploy("n1", "host", 4)
    await store.append_deploy_log(second.id, "out\n", keep=100)
    await store.request_cancel(second.id, "stop")
    await store.report_deploy(second.id, DeployStatus.SUCCEEDED, 0)
    await store.finish_deploy(second.id, DeployStatus.CANCELLED, at("2026-01-01T00:00:00Z"))
    assert heard == [
        ("queue", first.id),
        ("done", first.id),
        ("queue", second.id),
        ("log", second.id),
        ("cancel", second.id),
        ("report", second.id),
        ("done", second.id),
    ]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_other_processes_hear_changes_through_postgresql(backend: Backend) -> None:
    listener = await open_store(backend.target)
    try:
        heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        listener.subscribe(lambda kind, deploy_id: heard.put_nowait((kind, deploy_id)))
        await listener.start_listening()
        assert await asyncio.wait_for(heard.get(), 10) == ("queue", 0)  # listening now
        assert listener.hears_others
        app = await app_with_owner(backend.store)
        deploy = (await backend.store.queue_deploy(new_deploy(app))).deploy
        assert await asyncio.wait_for(heard.get(), 10) == ("queue", deploy.id)
        await backend.store.append_deploy_log(deploy.id, "line\n", keep=100)
        assert await asyncio.wait_for(heard.get(), 10) == ("log", deploy.id)
    finally:
        await listener.close()


async def test_regression_output_any_backend_stores_and_counts_alike(store: Store) -> None:
    """NUL bytes and lone surrogates (a deploy's output, a receiver's JSON) are stored as
    U+FFFD and "?", counted as stored: PostgreSQL's text refuses NUL, and a count taken
    before a replacement would let a log outgrow its limit."""
    app = await app_with_owner(store)
    deploy = (await store.queue_deploy(new_deploy(app))).deploy
    await store.append_deploy_log(deploy.id, "a\x00b\ud800c", keep=100)
    (chunk,) = await store.deploy_log(deploy.id)
    assert chunk.text == "a\ufffdb?c" and chunk.size == len(chunk.text.encode())


async def test_regression_a_lease_from_before_a_reboot_is_expired(tmp_path) -> None:
    """SQLite leases count on the machine's boot clock (the same for all its processes, never
    stepped by a wall-clock change): a renewal that lies ahead of it was made before the
    machine restarted, so that process is gone."""
    import sqlite3

    store = await open_store(tmp_path / "gw.db")
    try:
        app = await app_with_owner(store)
        await store.register_node("before-reboot", "host", 1)
        deploy = (await store.queue_deploy(new_deploy(app))).deploy
        await store.claim_deploy("before-reboot", "host", 4)
        await store.register_node("now", "host", 2)
        with sqlite3.connect(tmp_path / "gw.db") as db:
            db.execute("UPDATE nodes SET seen_at = seen_at + 100000 WHERE id = 'before-reboot'")
        gone = await store.expire_nodes(60)
        assert [d.id for d in gone] == [deploy.id]
        assert [n.id for n in await store.list_nodes()] == ["now"]
    finally:
        await store.close()
