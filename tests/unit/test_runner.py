"""The runner with a fake pipeline on a real SQLite store: claims, outcomes, timeouts,
cancels (audited once), the lease and fencing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from gateway.deploys import cancel_offline, pipelines
from gateway.deploys.outcome import Outcome
from gateway.errors import Conflict, NotFound
from gateway.models import DeployStatus, NewDeploy
from tests.unit.fake_pipeline import SHA, ZERO, claims_idle, rig, until


async def test_a_claimed_deploy_runs_its_pipeline_with_a_narrow_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        deploy = await r.queue()
        final = await r.done(deploy.id)
        assert (final.status, final.exit_code, final.runner) == (
            DeployStatus.SUCCEEDED,
            0,
            r.service.runner.node,
        )
        assert r.fake.runs == [deploy.id]
        fields = {f.name for f in dataclasses.fields(r.fake.contexts[0])}
        # What a run may use; the deploy service, its queue and leases are not in it.
        assert fields == {
            "log",
            "config",
            "repos",
            "git",
            "records",
            "metrics",
            "status_base_url",
            "wait_for_report",
        }
        text = await r.service.log_text(deploy.id)
        assert f"----> deploy #{deploy.id} of web: main aaaaaaaa (s) pushed by alice" in text
        assert f"fake pipeline ran #{deploy.id}" in text
        assert text.endswith(f"----> deploy #{deploy.id} succeeded in {text.split(' in ')[-1]}")
        assert not r.service.jobs


async def test_outcomes_and_errors_end_the_deploy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        r.fake.outcome = Outcome(DeployStatus.FAILED, 3, "exit code 3")
        failed = await r.done((await r.queue()).id)
        assert (failed.status, failed.exit_code, failed.reason) == (
            DeployStatus.FAILED,
            3,
            "exit code 3",
        )
        r.fake.error = RuntimeError("boom")
        crashed = await r.done((await r.queue()).id)
        assert (crashed.status, crashed.reason) == (DeployStatus.FAILED, "deploy error: boom")
        assert "deploy error: boom" in await r.service.log_text(crashed.id)


async def test_a_pipeline_over_its_timeout_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, timeout=0.3) as r:
        r.fake.release = asyncio.Event()
        final = await r.done((await r.queue()).id)
        assert (final.status, final.reason) == (DeployStatus.TIMED_OUT, "timed out after 0.3s")
        assert r.fake.cancelled == [final.id]


async def test_no_pipeline_any_more_and_a_lost_gated_push(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, start=False) as r:
        new = NewDeploy(r.app.id, "refs/heads/main", ZERO, SHA, "alice", "SHA256:x", "s", "a",
                        "gate", "fake")  # fmt: skip
        gated = await r.service.runner.queue(new, (tmp_path / "quarantine", ZERO))
        r.service.runner.gated.clear()  # what held its quarantine is gone
        await r.service.start()
        final = await r.done(gated.id)
        assert (final.status, final.reason) == (
            DeployStatus.INTERRUPTED,
            "the gated push was lost with its gateway",
        )
        r.configure(command=[])
        unconfigured = await r.done((await r.queue()).id)
        assert (unconfigured.status, unconfigured.reason) == (
            DeployStatus.CANCELLED,
            "no deploy pipeline any more",
        )
        assert r.fake.runs == []


async def test_one_deploy_per_app_and_max_parallel_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, max_parallel=1) as r:
        r.fake.release = asyncio.Event()
        other = await r.store.create_app("api", "alice", "main")
        first = await r.queue()
        second = await r.queue(other)
        await r.fake.started.wait()
        await claims_idle(r.service)
        assert r.fake.runs == [first.id]
        assert (await r.store.get_deploy(second.id)).status is DeployStatus.QUEUED
        r.fake.release.set()
        assert (await r.done(second.id)).status is DeployStatus.SUCCEEDED
        assert r.fake.runs == [first.id, second.id]


async def test_cancel_stops_a_running_deploy_and_is_audited_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        r.fake.release = asyncio.Event()
        deploy = await r.queue()
        await r.fake.started.wait()
        final = await r.service.cancel(deploy.id, "bob", fingerprint="SHA256:k", source="1.2.3.4")
        assert (final.status, final.reason) == (DeployStatus.CANCELLED, "cancelled by bob")
        assert r.fake.cancelled == [deploy.id]
        with pytest.raises(Conflict):
            await r.service.cancel(deploy.id, "bob")
        with pytest.raises(NotFound):
            await r.service.cancel(deploy.id + 100, "bob")
        events = [e for e in await r.store.list_audit(app="web") if e.event == "deploy_cancelled"]
        assert [(e.actor, e.fingerprint, e.source, json.loads(e.detail)) for e in events] == [
            ("bob", "SHA256:k", "1.2.3.4", {"deploy": deploy.id})
        ]


async def test_cancel_of_a_queued_deploy_and_the_offline_cancel_audit_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, start=False) as r:
        queued = await r.queue()
        final = await r.service.cancel(queued.id, "operator")
        assert (final.status, final.reason) == (DeployStatus.CANCELLED, "cancelled by operator")
        other = await r.queue()
        offline = await cancel_offline(r.store, other.id, actor="operator")
        assert offline.status is DeployStatus.CANCELLED
        with pytest.raises(Conflict):
            await cancel_offline(r.store, other.id, actor="operator")
        events = [e for e in await r.store.list_audit(app="web") if e.event == "deploy_cancelled"]
        assert sorted((e.actor, json.loads(e.detail)["deploy"]) for e in events) == [
            ("operator", queued.id),
            ("operator", other.id),
        ]


async def test_cancel_app_stops_its_deploys_without_a_cancel_event_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        r.fake.release = asyncio.Event()
        running = await r.queue()
        await r.fake.started.wait()
        waiting = await r.queue()
        assert await r.service.cancel_app("web", "alice (app removed)") == 2
        assert (await r.store.get_deploy(running.id)).status is DeployStatus.CANCELLED
        assert (await r.store.get_deploy(waiting.id)).status is DeployStatus.CANCELLED
        assert not [e for e in await r.store.list_audit() if e.event == "deploy_cancelled"]


async def test_a_process_that_cannot_renew_its_lease_fences_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, node_timeout=0.5) as r:
        r.fake.release = asyncio.Event()
        renew = r.store.renew_node
        registry_back = asyncio.Event()

        async def hanging(node: str) -> bool:
            await registry_back.wait()
            return await renew(node)

        monkeypatch.setattr(r.store, "renew_node", hanging)
        running = await r.queue()
        final = await r.done(running.id)
        assert (final.status, final.reason) == (
            DeployStatus.INTERRUPTED,
            "this gateway lost touch with the registry",
        )
        assert r.service.runner.fenced
        waiting = await r.queue()
        await claims_idle(r.service)
        assert (await r.store.get_deploy(waiting.id)).status is DeployStatus.QUEUED
        r.fake.release.set()
        registry_back.set()
        await until(lambda: not r.service.runner.fenced)
        assert (await r.done(waiting.id)).status is DeployStatus.SUCCEEDED


async def test_a_process_declared_gone_stops_its_deploys_and_joins_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, node_timeout=0.5) as r:
        r.fake.release = asyncio.Event()
        renew = r.store.renew_node
        lost = asyncio.Event()

        async def gone_once(node: str) -> bool:
            if lost.is_set():
                return await renew(node)
            lost.set()
            await r.store.leave_node(node)  # as the others do when its lease lapses
            return False

        running = await r.queue()
        await r.fake.started.wait()
        monkeypatch.setattr(r.store, "renew_node", gone_once)
        final = await r.done(running.id)
        assert final.status is DeployStatus.INTERRUPTED
        assert r.fake.cancelled == [running.id]
        await until(lambda: r.service.runner.lease.fenced is False)
        nodes = {n.id for n in await r.store.list_nodes()}
        assert r.service.runner.node in nodes


async def test_closing_interrupts_what_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        r.fake.release = asyncio.Event()
        running = await r.queue()
        await r.fake.started.wait()
        await r.service.close()
        final = await r.store.get_deploy(running.id)
        assert (final.status, final.reason) == (DeployStatus.INTERRUPTED, "the gateway stopped")


def test_the_registry_of_kinds_validates_a_recorded_kind() -> None:
    assert {"command", "webhook"} <= set(pipelines.KINDS)  # and any module added there
    assert pipelines.get("webhook").kind == "webhook"
    with pytest.raises(Exception, match="unknown deploy pipeline kind 'podman'"):
        pipelines.get("podman")
