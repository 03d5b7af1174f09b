"""The hooks' requests answered with a fake pipeline, on a real repository and SQLite store:
attached, detached and gate modes, push options, and hooks that are not what they claim."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.deploys.outcome import Outcome
from gateway.deploys.pushes import Peer, PushSession
from gateway.models import DeployStatus, Identity
from tests.unit.fake_pipeline import ZERO, Rig, rig

GIT_ENV = {
    "PATH": os.environ.get("PATH", os.defpath),
    "GIT_AUTHOR_NAME": "A",
    "GIT_AUTHOR_EMAIL": "a@example.test",
    "GIT_COMMITTER_NAME": "A",
    "GIT_COMMITTER_EMAIL": "a@example.test",
}
ME = Peer(os.getpid(), os.geteuid(), os.getegid())  # a hook whose parent is "receive-pack"


async def git(repo: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git", "-C", str(repo), *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, env=GIT_ENV,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, args
    return out.decode().strip()


class Push:
    """One push of a new commit to `ref`, as receive-pack's hooks would present it."""

    def __init__(self, r: Rig, session: PushSession, repo: Path, sha: str, ref: str) -> None:
        self.r, self.session, self.repo, self.sha, self.ref = r, session, repo, sha, ref
        self.said: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.said)

    async def say(self, text: str) -> None:
        self.said.append(text)

    async def hook(self, name: str, peer: Peer = ME, **extra: Any) -> int:
        request = {
            "hook": name,
            "token": self.session.token,
            "updates": [[ZERO, self.sha, self.ref]],
            **extra,
        }
        return await self.r.service.handle_hook(request, self.say, peer)

    async def pre_receive(self, options: list[str] | None = None) -> int:
        incoming = self.repo / "objects" / "tmp_objdir-incoming-test"
        incoming.mkdir(exist_ok=True)
        return await self.hook("pre-receive", quarantine=str(incoming), options=options)

    async def post_receive(self) -> int:
        await git(self.repo, "update-ref", self.ref, self.sha)  # receive-pack moved it
        return await self.hook("post-receive")

    async def both(self, options: list[str] | None = None) -> tuple[int, int]:
        before = await self.pre_receive(options)
        if before != 0:
            return before, -1
        return before, await self.post_receive()


async def new_push(r: Rig, ref: str = "refs/heads/main") -> Push:
    repo = await asyncio.to_thread(r.repos.create, "web", "main")
    tree = await git(repo, "hash-object", "-t", "tree", "-w", "--stdin")
    sha = await git(repo, "commit-tree", tree, "-m", "the change")
    identity = Identity(1, "alice", 1, "laptop", "SHA256:alicekey")
    session = await r.service.open_session(identity, r.app, "conn-1", "192.0.2.1")
    r.service.pushes.bind(session, os.getppid())
    return Push(r, session, repo, sha, ref)


async def test_attached_streams_the_deploy_to_the_pusher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        push = await new_push(r)
        assert await push.both() == (0, 0)
        assert "deploy #1 of web " in push.text
        assert "Ctrl-C stops watching, not the deploy." in push.text
        assert "fake pipeline ran #1" in push.text
        assert "deploy #1 succeeded in " in push.text
        assert not push.session.failed
        pushes = [e for e in await r.store.list_audit(app="web") if e.event == "push"]
        assert [(e.actor, e.source) for e in pushes] == [("alice", "192.0.2.1")]


async def test_attached_failure_marks_the_push_failed_and_keeps_the_refs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        r.fake.outcome = Outcome(DeployStatus.FAILED, 3, "exit code 3")
        push = await new_push(r)
        assert await push.both() == (0, 0)
        assert "deploy #1 FAILED (exit code 3)" in push.text
        assert "The push itself is stored." in push.text
        assert push.session.failed


async def test_detached_queues_and_returns_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, mode="detached") as r:
        r.fake.release = asyncio.Event()
        push = await new_push(r)
        assert await push.both() == (0, 0)
        assert "deploy #1 of web queued" in push.text and "the push is done" in push.text
        assert "logs web 1 --follow" in push.text
        assert not (await r.store.get_deploy(1)).status.finished
        r.fake.release.set()
        assert (await r.done(1)).status is DeployStatus.SUCCEEDED


async def test_gate_deploys_before_the_refs_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, mode="gate") as r:
        push = await new_push(r)
        assert await push.pre_receive() == 0
        assert "gate mode, the branch moves only if this deploy succeeds" in push.text
        assert "deploy #1 succeeded" in push.text and "updating main" in push.text
        assert await push.post_receive() == 0
        assert r.fake.runs == [1]  # post-receive does not deploy it again
        assert not r.service.runner.gated and not r.service.runner.watched_here


async def test_gate_failure_rejects_the_push(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, mode="gate") as r:
        r.fake.outcome = Outcome(DeployStatus.FAILED, 1, "exit code 1")
        push = await new_push(r)
        assert await push.pre_receive() == 1
        assert "push rejected, main unchanged" in push.text


@pytest.mark.parametrize("option", ["deploy.skip", "deploy.detach"])
async def test_gate_mode_cannot_be_opted_out_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    async with rig(tmp_path, monkeypatch, mode="gate") as r:
        push = await new_push(r)
        assert await push.pre_receive([option]) == 1
        assert f"push refused: {option} is not available for web: it deploys in gate mode" in (
            push.text
        )
        assert r.fake.runs == [] and await r.store.list_deploys("web") == []


async def test_skip_in_attached_mode_stores_without_deploying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        push = await new_push(r)
        assert await push.both(["deploy.skip"]) == (0, 0)
        assert "not deployed (deploy.skip); the next push without it deploys" in push.text
        assert await r.store.list_deploys("web") == []


async def test_without_a_pipeline_or_on_another_branch_nothing_deploys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch, command=[]) as r:
        push = await new_push(r)
        assert await push.both() == (0, 0)
        assert "no deploy pipeline is configured for web: nothing deployed" in push.text
        r.configure()
        other = Push(r, push.session, push.repo, push.sha, "refs/heads/feature")
        push.session.spoken.clear()
        assert await other.both() == (0, 0)
        assert "'feature' stored, not deployed: web deploys 'main'" in other.text
        assert await r.store.list_deploys("web") == []


async def test_regression_hooks_of_another_push_a_replay_or_a_stranger_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path, monkeypatch) as r:
        push = await new_push(r)
        assert await push.post_receive() == 0
        assert await push.hook("post-receive") == 0  # a replay: refused, nothing deployed
        stranger = Peer(os.getpid(), os.geteuid() + 1, os.getegid())
        assert await push.hook("pre-receive", peer=stranger) == 1
        forged = Push(r, push.session, push.repo, push.sha, push.ref)
        forged.session = PushSession("forged", *(getattr(push.session, f) for f in (
            "identity", "app", "conn_id", "peer", "refs_before")))  # fmt: skip
        assert await forged.hook("pre-receive") == 1
        assert push.text.count("this push is not known to the gateway") == 2
        assert "this push is not known to the gateway" in forged.text
        await asyncio.wait_for(r.service.wait_done(1), 10)
        assert len(await r.store.list_deploys("web")) == 1
