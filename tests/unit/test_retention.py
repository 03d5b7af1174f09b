"""Failed-login aggregation and retention, against a real SQLite registry and log directory."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import config as gwconfig
from gateway.domain.audit import OTHER_SOURCES, AuthFailures
from gateway.domain.retention import prune
from gateway.keys import parse_public_key
from gateway.models import AuditEvent, DeployStatus, NewDeploy
from gateway.store import open_store
from gateway.times import parse as at
from tests.helpers import keygen

T0 = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path):
    s = await open_store(tmp_path / "gw.db")
    yield s
    await s.close()


async def failures(store) -> list[AuditEvent]:
    return [e for e in await store.list_audit(limit=10_000) if e.event == "auth_failed"]


async def test_failures_are_counted_per_source_minute_and_kind(store):
    agg = AuthFailures(store)
    for second in range(100):
        agg.add("10.0.0.1", "disconnected", "closed", now=T0 + timedelta(seconds=second))
    agg.add("10.0.0.1", "unknown_key", "unknown key", "SHA256:a", 3, now=T0)
    agg.add("10.0.0.1", "unknown_key", "unknown key", "SHA256:b", 2, now=T0)
    agg.add("10.0.0.2", "bad_user", "SSH user 'root' is not accepted", now=T0)
    # Nothing is written while its minute runs.
    assert await agg.flush(now=T0 + timedelta(seconds=30)) == 0
    assert await failures(store) == []
    # The first minute (12:00) ends: its three buckets are written; 12:01 is still open.
    assert await agg.flush(now=T0 + timedelta(seconds=60)) == 3
    rows = {(e.source, json.loads(e.detail)["kind"]): e for e in await failures(store)}
    assert set(rows) == {
        ("10.0.0.1", "disconnected"),
        ("10.0.0.1", "unknown_key"),
        ("10.0.0.2", "bad_user"),
    }
    unknown = json.loads(rows[("10.0.0.1", "unknown_key")].detail)
    assert unknown == {
        "attempts": 5,
        "count": 2,
        "fingerprints": ["SHA256:a", "SHA256:b"],
        "kind": "unknown_key",
        "minute": "2026-03-01T12:00Z",
        "reason": "unknown key",
    }
    assert json.loads(rows[("10.0.0.1", "disconnected")].detail)["count"] == 55
    # Shutdown writes what is left, the running minute included.
    assert await agg.flush(now=T0 + timedelta(seconds=61), everything=True) == 1
    total = sum(json.loads(e.detail)["count"] for e in await failures(store))
    assert total == 103 and agg.buckets == {}


async def test_regression_a_scan_from_many_addresses_is_bounded_in_memory(store):
    agg = AuthFailures(store, max_buckets=50)
    for i in range(10_000):
        agg.add(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "disconnected", "closed", now=T0)
    assert len(agg.buckets) == 51  # 50 sources and the overflow
    await agg.flush(everything=True)
    rows = await failures(store)
    assert len(rows) == 51
    other = next(e for e in rows if e.source == OTHER_SOURCES)
    assert json.loads(other.detail)["count"] == 10_000 - 50


def old(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_regression_prune_removes_old_records_and_their_logs(store, tmp_path):
    cfg = gwconfig.from_mapping(
        {
            "deploy": {"retention": 30, "keep_last": 1},
            "audit": {"retention": 30},
        }
    )
    await store.create_user("alice")
    key = parse_public_key(Path(f"{keygen(tmp_path / 'k')}.pub").read_text())
    await store.add_key("alice", "k", key)
    apps = [await store.create_app(name, "alice", "main") for name in ("web", "api")]

    async def deploy(app, finished_days_ago=None, status=DeployStatus.SUCCEEDED, started=False):
        record = await store.create_deploy(
            NewDeploy(
                app.id,
                "refs/heads/main",
                "0" * 40,
                "1" * 40,
                "alice",
                "SHA256:x",
                "subject",
                "author",
                "attached",
                "command",
            )
        )
        if started:
            await store.start_deploy(record.id, old(100))
        if finished_days_ago is not None:
            await store.finish_deploy(record.id, status, old(finished_days_ago))
        await store.append_deploy_log(record.id, f"log of #{record.id}\n", keep=1000)
        return record.id

    web_old = [await deploy(apps[0], 100), await deploy(apps[0], 60, DeployStatus.FAILED)]
    web_newest_old = await deploy(apps[0], 40)  # old, but the newest finished: kept
    web_running = await deploy(apps[0], started=True)  # started 100 days ago, still running
    web_queued = await deploy(apps[0])
    api_old = await deploy(apps[1], 90, DeployStatus.CANCELLED)
    api_recent = await deploy(apps[1])
    # A kept record naming a pruned one (as superseded_by) does not block the pruning.
    await store.finish_deploy(api_recent, DeployStatus.CANCELLED, old(1), superseded_by=api_old)
    for days in (400, 31, 29, 0):
        await store.add_audit(AuditEvent("auth_ok", actor="alice", at=old(days)))

    result = await prune(store, cfg)

    assert (result.audit, result.deploys) == (2, 3)
    gone = [*web_old, api_old]
    kept = [web_newest_old, web_running, web_queued, api_recent]
    for deploy_id in gone:
        assert await store.get_deploy(deploy_id) is None
        assert await store.deploy_log(deploy_id) == []  # the log went with the record
    for deploy_id in kept:
        assert await store.get_deploy(deploy_id) is not None
        assert [c.text for c in await store.deploy_log(deploy_id)] == [f"log of #{deploy_id}\n"]
    assert (await store.get_deploy(api_recent)).superseded_by is None
    assert len(await store.list_audit()) == 2
    # Nothing left to do: a second run prunes nothing.
    assert await prune(store, cfg) == type(result)()


async def test_retention_zero_keeps_everything(store, tmp_path):
    cfg = gwconfig.from_mapping(
        {"deploy": {"retention": 0, "log_dir": str(tmp_path)}, "audit": {"retention": 0}}
    )
    await store.add_audit(AuditEvent("auth_ok", at=at("2000-01-01T00:00:00Z")))
    assert (await prune(store, cfg)).audit == 0
    assert len(await store.list_audit()) == 1
