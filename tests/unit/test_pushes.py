"""Push sessions: a hook is believed only from its own receive-pack, once, and only for ref
updates the repository confirms."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gateway.deploys.pushes import (
    HookRefused,
    Peer,
    PushSessions,
    RefUpdate,
    parse_updates,
    read_refs,
    verify_after,
    verify_before,
)
from gateway.models import App, Identity

IDENTITY = Identity(1, "alice", 1, "laptop", "SHA256:x")
APP = App(1, "web", 1, "alice", "main", "2026-01-01T00:00:00Z")
ZERO = "0" * 40


@pytest.fixture
def child():
    """A real child process of this test: what a hook is to its receive-pack."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait(10)


def session_for_me(sessions: PushSessions):  # type: ignore[no-untyped-def]
    session = sessions.open(IDENTITY, APP, "c1", "-", {})
    sessions.bind(session, os.getpid())  # this process plays receive-pack
    return session


def test_a_hook_of_the_push_speaks_once(child):
    sessions = PushSessions()
    session = session_for_me(sessions)
    me = Peer(child.pid, os.geteuid(), os.getegid())
    assert sessions.claim(session.token, "pre-receive", me) is session
    assert sessions.claim(session.token, "post-receive", me) is session
    with pytest.raises(HookRefused, match="hook_replayed"):
        sessions.claim(session.token, "post-receive", me)


def test_regression_token_from_another_process_is_refused(child):
    sessions = PushSessions()
    session = session_for_me(sessions)
    with pytest.raises(HookRefused, match="not_a_hook_of_this_push"):
        sessions.claim(session.token, "post-receive", Peer(os.getpid(), os.geteuid(), 0))
    with pytest.raises(HookRefused, match="foreign_peer"):
        sessions.claim(session.token, "post-receive", Peer(child.pid, os.geteuid() + 1, 0))
    with pytest.raises(HookRefused, match="unknown_token"):
        sessions.claim("x" + session.token, "post-receive", Peer(child.pid, os.geteuid(), 0))
    with pytest.raises(HookRefused, match="unknown_hook"):
        sessions.claim(session.token, "update", Peer(child.pid, os.geteuid(), 0))
    sessions.close(session)
    with pytest.raises(HookRefused, match="unknown_token"):
        sessions.claim(session.token, "post-receive", Peer(child.pid, os.geteuid(), 0))


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [["a" * 40, "b" * 40]],
        [["a" * 40, "b" * 40, "HEAD"]],
        [["a" * 40, "B" * 40, "refs/heads/x"]],
        [["a" * 40, "b" * 40, "refs/heads/a b"]],
        [["a" * 40, "b" * 40, "refs/heads/\x1b[2J"]],
        [["a" * 40, "b" * 40, 7]],
    ],
)
def test_malformed_updates_are_refused(raw):
    with pytest.raises(HookRefused):
        parse_updates(raw)


def test_any_valid_branch_name_parses():
    names = ["refs/heads/feature/a,b", "refs/heads/été", "refs/heads/日本", "refs/tags/v1.0"]
    assert [u.ref for u in parse_updates([["a" * 40, "b" * 40, n] for n in names])] == names


def git(repo: Path, *args: str) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(repo),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@x",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@x",
    }
    result = subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()


def test_updates_are_checked_against_the_repository(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "core.logAllRefUpdates", "true")
    git(repo, "commit", "-q", "--allow-empty", "-m", "one")
    one = git(repo, "rev-parse", "HEAD")
    before = read_refs(repo / ".git")
    git(repo, "commit", "-q", "--allow-empty", "-m", "two")
    two = git(repo, "rev-parse", "HEAD")
    gitdir = repo / ".git"
    # What really happened is believed...
    assert verify_after(gitdir, [RefUpdate(one, two, "refs/heads/main")], before)
    # ...a claim that the branch went elsewhere, or came from elsewhere, is not.
    with pytest.raises(HookRefused, match="ref_mismatch"):
        verify_after(gitdir, [RefUpdate(two, one, "refs/heads/main")], before)
    with pytest.raises(HookRefused, match="ref_mismatch"):
        verify_after(gitdir, [RefUpdate(ZERO, two, "refs/heads/main")], before)
    with pytest.raises(HookRefused, match="ref_mismatch"):
        verify_after(gitdir, [RefUpdate(ZERO, one, "refs/heads/other")], before)
    # Another push moved the branch meanwhile: the reflog says exactly which move was ours.
    assert verify_after(gitdir, [RefUpdate(one, two, "refs/heads/main")], {})
    # pre-receive: nothing has moved yet.
    verify_before(gitdir, [RefUpdate(two, one, "refs/heads/main")])
    with pytest.raises(HookRefused, match="ref_mismatch"):
        verify_before(gitdir, [RefUpdate(one, two, "refs/heads/main")])


def test_regression_a_long_reflog_is_never_read_whole(tmp_path: Path) -> None:
    """Review 2: post-receive read a ref's whole reflog (a line a push, for ever) into the
    gateway to take its last line when pushes interleave: 200000 lines (~30 MB, a few hours
    of one tenant's pushes) took ~100 MB of the gateway's memory. Only the tail is read."""
    import tracemalloc

    gitdir = tmp_path / "r.git"
    (gitdir / "logs" / "refs" / "heads").mkdir(parents=True)
    one, two, who = "1" * 40, "2" * 40, "gateway <git@gateway> 1767225600 +0000"
    line = f"{two} {one} {who}\tpush\n"
    (gitdir / "logs" / "refs" / "heads" / "main").write_text(
        line * 200_000 + f"{one} {two} {who}\tpush\n"
    )
    (gitdir / "refs" / "heads").mkdir(parents=True)
    (gitdir / "refs" / "heads" / "main").write_text(f"{two}\n")
    (gitdir / "HEAD").write_text("ref: refs/heads/main\n")
    (gitdir / "objects").mkdir()
    (gitdir / "config").write_text("[core]\n\tbare = true\n")
    tracemalloc.start()
    try:
        assert verify_after(gitdir, [RefUpdate(one, two, "refs/heads/main")], {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    with pytest.raises(HookRefused, match="ref_mismatch"):
        verify_after(gitdir, [RefUpdate(two, one, "refs/heads/main")], {})
