"""The shared deploy queue under stress: a gateway cut off from its registry, a draining
gateway, a webhook receiver that floods reports (found by the hostile review of the queue)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from gateway import config as gwconfig
from gateway.deploys.reports import REPORT_TEXT, REPORTS_PER_SECOND
from gateway.deploys.service import DeployService
from gateway.git.repos import Repositories
from gateway.models import DeployStatus, NewDeploy
from gateway.store import open_store
from tests.e2e.test_deploys import deploy_processes, wait_for_condition
from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    Admin,
    Client,
    LiveProcess,
    ServeProcess,
    write_config,
)


def deploy_config(tmp_path: Path, **deploy: object) -> Path:
    return write_config(
        tmp_path / "state",
        deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], **deploy},
        cluster={"node_timeout": 2},
    )


def test_regression_a_gateway_cut_off_from_its_registry_stops_its_deploys(tmp_path, exchange):
    """Another process holds the SQLite registry's write lock: the gateway cannot renew its
    lease, so within half the node timeout it stops the deploy it runs (the others would
    soon declare it gone and start the app's next deploy: never two at once). Once the
    registry answers, the deploy is recorded interrupted and deploys run again."""
    config = deploy_config(tmp_path, mode="detached")
    admin = Admin(config)
    key = admin.enroll("cut", tmp_path, "web")
    server = ServeProcess(config)
    try:
        client = Client(tmp_path / "home", key, server, name="cut")
        fifo = exchange / "gate.fifo"
        os.mkfifo(fifo)
        work = client.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
        client.git("push", "-q", client.url("web"), "main", cwd=work)
        server.wait_for(r"event=deploy_started deploy=1 ")
        wait_for_condition(lambda: deploy_processes("web", 1) != [], "deploy #1 runs")
        database = sqlite3.connect(server.config.storage.database, timeout=30)
        try:
            database.execute("BEGIN IMMEDIATE")  # the registry is locked, as by a stuck peer
            server.wait_for(r"event=deploy_node_fenced .*running=1")
            wait_for_condition(lambda: deploy_processes("web", 1) == [], "deploy #1 stopped")
        finally:
            database.rollback()
            database.close()
        server.wait_for(r"event=deploy_finished deploy=1 app=web status=interrupted")
        if "event=deploy_node_unfenced" not in server.stderr:  # may come before that line
            server.wait_for(r"event=deploy_node_unfenced")
        record = {d["id"]: d for d in deploys(admin)}[1]
        assert record["reason"] == "this gateway lost touch with the registry"
        (work / "wait-fifo").unlink()
        client.commit(work, {}, "again")
        client.git("push", "-q", client.url("web"), "main", cwd=work)
        server.wait_for(r"event=deploy_finished deploy=2 app=web status=succeeded")
    finally:
        assert server.stop() == 0


def deploys(admin: Admin) -> list[dict]:
    import json

    return json.loads(admin.ok("deploy", "list", "web", "--json"))


def test_regression_a_draining_gateway_runs_what_its_pushers_wait_for(tmp_path, exchange):
    """SIGTERM while an attached push waits behind a running deploy: the draining gateway
    claims nothing new for others, but it runs the deploy its own pusher waits for, so the
    drain ends when that deploy does, not at drain_timeout with the pusher cut off."""
    config = deploy_config(tmp_path)
    admin = Admin(config)
    key = admin.enroll("dee", tmp_path, "web")
    server = ServeProcess(config)
    client = Client(tmp_path / "home", key, server, name="dee")
    fifo = exchange / "gate.fifo"
    os.mkfifo(fifo)
    work = client.new_repo(tmp_path / "work", {"wait-fifo": str(fifo)})
    first = LiveProcess(["git", "push", client.url("web"), "main"], env=client.env, cwd=work)
    first.wait_for(r"waiting for the test")
    client.commit(work, {"wait-fifo": ""}, "next")
    (work / "wait-fifo").unlink()
    client.commit(work, {}, "no fifo")
    second = LiveProcess(["git", "push", client.url("web"), "main"], env=client.env, cwd=work)
    second.wait_for(r"queued behind #1")
    server.proc.terminate()
    server.wait_for(r"event=draining")
    started = time.monotonic()
    with open(fifo, "w") as gate:
        gate.write("go\n")
    assert first.finish() == 0 and "deploy #1 succeeded" in first.stderr
    assert second.finish() == 0 and "deploy #2 succeeded" in second.stderr
    assert server.finish() == 0
    assert time.monotonic() - started < 30  # not drain_timeout (60 s)


async def test_regression_reports_for_a_deploy_running_elsewhere_are_paced(tmp_path):
    """A receiver's report for a deploy another process runs is written by the process that
    takes it: its text is cut to its tail and its rate is capped per deploy, so a flood of
    reports cannot make the shared registry write faster than a deploy's own output."""
    cfg = gwconfig.load(write_config(tmp_path / "state"))
    store = await open_store(cfg.storage.database)
    try:
        await store.create_user("ann")
        app = await store.create_app("web", "ann", "main")
        new = NewDeploy(app.id, "refs/heads/main", "0" * 40, "1" * 40, "ann", "fp", "s", "a",
                        "attached", "webhook")  # fmt: skip
        deploy = (await store.queue_deploy(new)).deploy
        await store.register_node("elsewhere", "other-host", 1)
        assert await store.claim_deploy("elsewhere", "other-host", 4) is not None
        repos = Repositories(cfg.storage.repos, cfg.git.max_input_size)
        service = DeployService(cfg, store, repos)
        answers = [await service.report(deploy.id, "x" * 100_000, None, None) for _ in range(20)]
        assert answers.count("ok") <= REPORTS_PER_SECOND + 1
        assert "slow down" in answers
        chunks = await store.deploy_log(deploy.id)
        assert all(c.size <= REPORT_TEXT + 1 for c in chunks)
        assert await service.report(deploy.id, None, DeployStatus.SUCCEEDED, 0) == "ok"
        assert await service.report(deploy.id, None, DeployStatus.FAILED, 1) == "not waiting"
    finally:
        await store.close()
