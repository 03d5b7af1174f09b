"""Planted repositories: whatever is written into an app's repository on disk (by a
compromised deploy or a stray operator), nothing planted there ever runs through the gateway,
and nothing there reaches another app's repository.

Each test plants one thing directly in the server's repository, first proves it is live (git
run directly on the repository, without the gateway, runs the planted program or follows
the planted path), then runs the real git operation through the gateway and shows that the
planted program never ran, that the planted path was not followed, and that the gateway
logged the removal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest

from gateway.git.repos import ATTRIBUTES
from tests.helpers import (
    Admin,
    Client,
    ServerThread,
    keygen,
    run,
    server_refs,
    unique,
    write_config,
)

PLANTED = re.compile(r"event=repo_planted_removed (?:app=(\S+) )?path=(\S+) action=(\w+)")


@pytest.fixture(autouse=True)
def _capture_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="gateway")


def removals(caplog, app: str | None) -> list[tuple[str, str]]:
    """(path, action) of every removal the gateway logged for this app, in order."""
    found = []
    for record in caplog.records:
        match = PLANTED.search(record.getMessage())
        if match and match.group(1) == app:
            found.append((match.group(2).strip('"'), match.group(3)))
    return found


def local_env(home: Path) -> dict[str, str]:
    """git run directly on the server's disk, as a stray operator would."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "x",
        "GIT_AUTHOR_EMAIL": "x@example.com",
        "GIT_COMMITTER_NAME": "x",
        "GIT_COMMITTER_EMAIL": "x@example.com",
    }


def shell_hook(marker: Path) -> str:
    return f"#!/bin/sh\ntouch '{marker}'\ncat >/dev/null\nexit 0\n"


def plant_hook(path: Path, marker: Path) -> None:
    path.write_text(shell_hook(marker))
    path.chmod(0o755)


def add_config(repo: Path, *lines: str) -> None:
    with open(repo / "config", "a") as config:
        config.write("".join(f"{line}\n" for line in lines))


def direct_push(work: Path, repo: Path, refspec: str, home: Path) -> None:
    run(["git", "push", "-q", str(repo), refspec], env=local_env(home), cwd=work, check=True)


def consume(marker: Path) -> None:
    """The control run proved the plant live: its marker is removed before the real test."""
    assert marker.exists(), "the planted program did not run even without the gateway"
    marker.unlink()


def gateway_config(server: ServerThread) -> bytes:
    return server.gateway.repos.layout.config


@pytest.fixture
def pushed(owner: Client, app: str, tmp_path: Path) -> Path:
    """The owner's working copy, pushed once to the app through the gateway."""
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    return work


# -- hooks --


@pytest.mark.parametrize(
    "hook", ["pre-receive", "update", "reference-transaction", "post-receive", "post-update"]
)
def test_regression_planted_hook_never_runs(hook, owner, app, server, pushed, tmp_path, caplog):
    marker = tmp_path / "ran"
    plant_hook(server.repo(app) / "hooks" / hook, marker)
    owner.commit(pushed, {"a": "1"}, "control")
    direct_push(pushed, server.repo(app), "main:refs/heads/control", tmp_path)
    consume(marker)
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    assert not marker.exists()
    assert not (server.repo(app) / "hooks" / hook).exists()
    assert removals(caplog, app) == [(f"hooks/{hook}", "removed")]


def test_regression_replaced_gateway_hook_never_runs(owner, app, server, pushed, tmp_path, caplog):
    """The gateway's own hooks directory, replaced by attacker content: put back before the
    push, so the planted version never runs."""
    marker = tmp_path / "ran"
    hooks_dir = server.repos / ".hooks"
    hook = hooks_dir / "pre-receive"
    original = hook.read_bytes()
    plant_hook(hook, marker)
    owner.commit(pushed, {"a": "1"}, "control")
    receive_pack = f"git -c core.hooksPath={hooks_dir} receive-pack"
    run(
        ["git", "push", "-q", f"--receive-pack={receive_pack}", str(server.repo(app)),
         "main:refs/heads/control"],
        env=local_env(tmp_path), cwd=pushed, check=True,
    )  # fmt: skip
    consume(marker)
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    assert not marker.exists()
    assert hook.read_bytes() == original and os.access(hook, os.X_OK)
    assert removals(caplog, None) == [(".hooks/pre-receive", "rewritten")]
    assert removals(caplog, app) == []


def test_regression_symlinked_hook_is_replaced_not_followed(
    owner, app, server, pushed, tmp_path, caplog
):
    marker = tmp_path / "ran"
    outside = tmp_path / "attacker-hook"
    plant_hook(outside, marker)
    in_repo = server.repo(app) / "hooks" / "post-receive"
    in_repo.symlink_to(outside)
    ours = server.repos / ".hooks" / "post-receive"
    ours.unlink()
    ours.symlink_to(outside)
    owner.commit(pushed, {"a": "1"}, "control")
    direct_push(pushed, server.repo(app), "main:refs/heads/control", tmp_path)
    consume(marker)
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    assert not marker.exists()
    assert not in_repo.exists() and not in_repo.is_symlink()
    assert not ours.is_symlink() and ours.is_file()
    # The gateway replaced the link; it never wrote through it.
    assert outside.read_text() == shell_hook(marker)
    assert removals(caplog, None) == [
        (".hooks/post-receive", "removed"),
        (".hooks/post-receive", "restored"),
    ]
    assert removals(caplog, app) == [("hooks/post-receive", "removed")]


def test_regression_hooks_directory_symlink(owner, app, server, pushed, tmp_path, caplog):
    marker = tmp_path / "ran"
    attacker = tmp_path / "attacker-hooks"
    attacker.mkdir()
    plant_hook(attacker / "post-update", marker)
    hooks = server.repo(app) / "hooks"
    hooks.rmdir()
    hooks.symlink_to(attacker)
    owner.commit(pushed, {"a": "1"}, "control")
    direct_push(pushed, server.repo(app), "main:refs/heads/control", tmp_path)
    consume(marker)
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    assert not marker.exists()
    assert not hooks.is_symlink() and list(hooks.iterdir()) == []
    assert sorted(p.name for p in attacker.iterdir()) == ["post-update"]  # left alone
    assert removals(caplog, app) == [("hooks", "removed")]


def test_regression_hook_planted_during_the_push_never_runs(tmp_path, caplog):
    """A deploy writes hooks/post-update into its own repository while post-receive waits
    for it: git would run it right after, in the same push, outside any deploy sandbox.
    git takes the gateway's hooks from a directory outside every repository."""
    marker = tmp_path / "ran"
    name, app = unique("planter"), unique("plantapp")
    # Sandboxed deploys cannot see any repository at all (test_regressions_tenants); without
    # the sandbox (single-tenant installations) a deploy can write into its own.
    repo = tmp_path / "gw" / "repos" / f"{app}.git"
    planter = (
        f"import os; p = os.path.join({str(repo)!r}, 'hooks', 'post-update'); "
        f"open(p, 'w').write({shell_hook(marker)!r}); os.chmod(p, 0o755); print('planted')"
    )
    config = write_config(
        tmp_path / "gw", deploy={"command": [sys.executable, "-c", planter], "sandbox": "none"}
    )
    server = ServerThread(config).start()
    try:
        admin = Admin(config)
        key = keygen(tmp_path / "key")
        admin.ok("user", "add", name)
        admin.ok("key", "add", name, "k", f"{key}.pub")
        admin.ok("app", "create", app, "--owner", name)
        client = Client(tmp_path / "home", key, server, name=name)
        work = client.new_repo(tmp_path / "work")
        push = client.git("push", client.url(app), "main", cwd=work)
        assert "planted" in push.stderr and "succeeded" in push.stderr
        hook = server.repo(app) / "hooks" / "post-update"
        assert hook.exists() and not marker.exists()  # planted, and did not run
        client.commit(work, {"a": "1"}, "control")
        direct_push(work, server.repo(app), "main:refs/heads/control", tmp_path)
        consume(marker)
        client.git("fetch", "-q", client.url(app), cwd=work)
        assert not hook.exists()
        assert removals(caplog, app) == [("hooks/post-update", "removed")]
    finally:
        server.stop()


# -- config keys --


def test_regression_config_hooks_path(owner, app, server, pushed, tmp_path, caplog):
    marker = tmp_path / "ran"
    attacker = tmp_path / "attacker-hooks"
    attacker.mkdir()
    plant_hook(attacker / "pre-receive", marker)
    add_config(server.repo(app), "[core]", f"\thooksPath = {attacker}")
    owner.commit(pushed, {"a": "1"}, "control")
    direct_push(pushed, server.repo(app), "main:refs/heads/control", tmp_path)
    consume(marker)
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    assert not marker.exists()
    assert (server.repo(app) / "config").read_bytes() == gateway_config(server)
    assert removals(caplog, app) == [("config", "rewritten")]


@pytest.mark.parametrize(
    "key",
    [
        "core.fsmonitor",
        "core.sshCommand",
        "uploadpack.packObjectsHook",
        "core.pager",
        "credential.helper",
        "receive.procReceiveRefs",
    ],
)
def test_regression_config_program_keys_are_removed(
    key, owner, app, server, pushed, tmp_path, caplog
):
    """Keys that name a program: git does not run these during a push or a clone of a bare
    repository (packObjectsHook is honoured from protected config only), but the config file
    is put back to exactly the gateway's, whatever it holds."""
    marker = tmp_path / "ran"
    section, name = key.split(".")
    value = "refs/heads" if key == "receive.procReceiveRefs" else f"touch {marker}"
    add_config(server.repo(app), f"[{section}]", f"\t{name} = {value}")
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    owner.git("clone", "-q", owner.url(app), str(tmp_path / "clone"))
    assert not marker.exists()
    assert (server.repo(app) / "config").read_bytes() == gateway_config(server)
    assert removals(caplog, app) == [("config", "rewritten")]


def archive(client: Client, url: str, fmt: str, out: Path, home: Path | None = None):
    argv = ["git", "archive", f"--remote={url}", f"--format={fmt}", "-o", str(out), "main"]
    env = client.env if home is None else local_env(home)
    return run(argv, env=env)


def test_regression_tar_filter_command_in_archive(owner, app, server, pushed, tmp_path, caplog):
    """`tar.<format>.command` is a program that `git archive` runs, and upload-archive
    honours the repository's config for tgz: a planted one would run on the server."""
    marker = tmp_path / "ran"
    repo = server.repo(app)
    add_config(repo, '[tar "tgz"]', f"\tcommand = touch {marker}; gzip -cn")
    control = archive(owner, f"file://{repo}", "tgz", tmp_path / "control.tgz", tmp_path)
    assert control.returncode == 0, control.stderr
    consume(marker)
    result = archive(owner, owner.url(app), "tgz", tmp_path / "out.tgz")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    listing = run(["tar", "tzf", str(tmp_path / "out.tgz")], check=True).stdout.split()
    assert listing == ["README"]
    assert removals(caplog, app) == [("config", "rewritten")]


def test_regression_user_defined_archive_format(owner, app, server, pushed, tmp_path, caplog):
    marker = tmp_path / "ran"
    repo = server.repo(app)
    add_config(repo, '[tar "evil"]', f"\tcommand = touch {marker}; cat", "\tremote = true")
    assert archive(owner, f"file://{repo}", "evil", tmp_path / "c", tmp_path).returncode == 0
    consume(marker)
    result = archive(owner, owner.url(app), "evil", tmp_path / "out")
    assert result.returncode != 0 and "unknown archive format" in result.stderr.lower()
    assert not marker.exists()
    assert removals(caplog, app) == [("config", "rewritten")]


def test_regression_smudge_filter_in_archive(owner, app, server, tmp_path, caplog):
    """A filter driver in config, selected by a pushed .gitattributes, runs in git archive.
    Two layers stop it: the config is put back, and the gateway's own info/attributes
    (planted over here too) turns every filter off whatever the pushed tree says."""
    marker = tmp_path / "ran"
    work = owner.new_repo(tmp_path / "work", {"README": "x\n", ".gitattributes": "* filter=ev\n"})
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    repo = server.repo(app)
    add_config(repo, '[filter "ev"]', f"\tsmudge = touch {marker}; cat")
    (repo / "info" / "attributes").write_text("* filter=ev\n")
    assert archive(owner, f"file://{repo}", "tar", tmp_path / "c", tmp_path).returncode == 0
    consume(marker)
    result = archive(owner, owner.url(app), "tar", tmp_path / "out.tar")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert sorted(removals(caplog, app)) == [
        ("config", "rewritten"),
        ("info/attributes", "rewritten"),
    ]


def test_regression_pushed_attributes_cannot_inflate_or_run_anything_in_archive(
    owner, app, server, tmp_path
):
    """The pushed tree's own .gitattributes (no planting needed) asks for export-subst: a
    few KiB of placeholders would make git build hundreds of MB in memory, and %G? makes it
    run gpg on a forged signature. The gateway's info/attributes turns it off: files are
    exported exactly as pushed."""
    text = "$Format:%H %G?$\n"
    work = owner.new_repo(tmp_path / "work", {"f": text, ".gitattributes": "* export-subst\n"})
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    result = archive(owner, owner.url(app), "tar", tmp_path / "out.tar")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "x"
    out.mkdir()
    run(["tar", "-xf", str(tmp_path / "out.tar"), "-C", str(out)], check=True)
    assert (out / "f").read_text() == text  # not expanded


def test_regression_config_include(owner, app, server, pushed, tmp_path, caplog):
    """include.path pulls in a file the gateway never sees; it is dropped with the rest."""
    marker = tmp_path / "ran"
    included = tmp_path / "included.cfg"
    included.write_text(f'[tar "tgz"]\n\tcommand = touch {marker}; gzip -cn\n')
    repo = server.repo(app)
    add_config(repo, "[include]", f"\tpath = {included}")
    assert archive(owner, f"file://{repo}", "tgz", tmp_path / "c.tgz", tmp_path).returncode == 0
    consume(marker)
    result = archive(owner, owner.url(app), "tgz", tmp_path / "out.tgz")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert included.exists()  # someone else's file: not ours to delete
    assert removals(caplog, app) == [("config", "rewritten")]


def test_regression_config_symlink(owner, app, server, pushed, tmp_path, caplog):
    marker = tmp_path / "ran"
    repo = server.repo(app)
    outside = tmp_path / "attacker.cfg"
    outside.write_bytes(
        (repo / "config").read_bytes()
        + f'[tar "tgz"]\n\tcommand = touch {marker}; gzip -cn\n'.encode()
    )
    (repo / "config").unlink()
    (repo / "config").symlink_to(outside)
    assert archive(owner, f"file://{repo}", "tgz", tmp_path / "c.tgz", tmp_path).returncode == 0
    consume(marker)
    assert archive(owner, owner.url(app), "tgz", tmp_path / "out.tgz").returncode == 0
    assert not marker.exists()
    assert not (repo / "config").is_symlink()
    assert b"command" in outside.read_bytes()  # replaced, never written through
    assert removals(caplog, app) == [("config", "removed"), ("config", "restored")]


# -- paths into another app's repository --


@pytest.fixture
def victim(make_user, admin, tmp_path) -> tuple[Client, str, str]:
    """Another tenant's app with a secret commit: (client, app, sha)."""
    client = make_user("victim")
    app = unique("victimapp")
    admin.ok("app", "create", app, "--owner", client.name)
    work = client.new_repo(tmp_path / "victim-work", {"secret.env": "DATABASE_URL=s3cr3t\n"})
    client.git("push", "-q", client.url(app), "main", cwd=work)
    sha = client.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    return client, app, sha


def test_regression_alternates_to_another_app(owner, app, server, pushed, victim, tmp_path, caplog):
    """objects/info/alternates pointing into another app's repository would let a pusher read
    that app's objects through their own app."""
    _, victim_app, secret = victim
    repo = server.repo(app)
    (repo / "objects" / "info" / "alternates").write_text(f"{server.repo(victim_app)}/objects\n")
    control = run(
        ["git", "fetch", "-q", f"file://{repo}", secret], env=local_env(tmp_path), cwd=pushed
    )
    assert control.returncode == 0, control.stderr  # live: the secret commit is readable
    thief = owner.new_repo(tmp_path / "thief")
    stolen = owner.git("fetch", owner.url(app), secret, cwd=thief, check=False)
    assert stolen.returncode != 0
    assert owner.git("cat-file", "-e", secret, cwd=thief, check=False).returncode != 0
    assert not (repo / "objects" / "info" / "alternates").exists()
    assert removals(caplog, app) == [("objects/info/alternates", "removed")]


def test_regression_alternate_refs_command(owner, app, server, pushed, victim, tmp_path, caplog):
    """With alternates, receive-pack runs core.alternateRefsCommand to advertise them."""
    _, victim_app, _ = victim
    marker = tmp_path / "ran"
    repo = server.repo(app)
    (repo / "objects" / "info" / "alternates").write_text(f"{server.repo(victim_app)}/objects\n")
    add_config(repo, "[core]", f"\talternateRefsCommand = touch {marker}; true")
    owner.commit(pushed, {"a": "1"}, "control")
    direct_push(pushed, repo, "main:refs/heads/control", tmp_path)
    consume(marker)
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    assert not marker.exists()
    assert removals(caplog, app) == [
        ("config", "rewritten"),
        ("objects/info/alternates", "removed"),
    ]


def test_regression_commondir_to_another_app(owner, app, server, pushed, victim, tmp_path, caplog):
    """A `commondir` file makes git use another repository's refs and objects: a push to
    one's own app would write into the victim's."""
    _, victim_app, _ = victim
    repo, target = server.repo(app), server.repo(victim_app)
    (repo / "commondir").write_text(f"{target}\n")
    direct_push(pushed, repo, "main:refs/heads/control", tmp_path)
    assert "refs/heads/control" in server_refs(target)  # live: it wrote into the victim
    owner.commit(pushed, {"b": "2"}, "second")
    owner.git("push", "-q", owner.url(app), "main:refs/heads/stolen", cwd=pushed)
    assert "refs/heads/stolen" not in server_refs(target)
    assert "refs/heads/stolen" in server_refs(repo)
    assert removals(caplog, app) == [("commondir", "removed")]


def test_regression_symlinked_refs_to_another_app(owner, app, server, victim, tmp_path, caplog):
    """A symlinked refs/heads would show, and let one write, the victim's branches through
    one's own app."""
    _, victim_app, secret = victim
    repo, target = server.repo(app), server.repo(victim_app)
    (repo / "refs" / "heads").rmdir()
    (repo / "refs" / "heads").symlink_to(target / "refs" / "heads")
    control = run(["git", "ls-remote", str(repo)], env=local_env(tmp_path), check=True)
    assert f"{secret}\trefs/heads/main" in control.stdout  # live: the victim's branch shows
    assert secret not in owner.git("ls-remote", owner.url(app)).stdout
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main:refs/heads/hijack", cwd=work)
    assert not (target / "refs" / "heads" / "hijack").exists()
    assert server_refs(target) == {"refs/heads/main": secret}
    assert "refs/heads/hijack" in server_refs(repo)
    assert removals(caplog, app) == [("refs/heads", "removed")]


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("shallow", "shallow"),  # hides history from clones
        ("info/grafts", "info/grafts"),  # rewrites history
        ("config.worktree", "config.worktree"),  # more config
        ("worktrees/x/gitdir", "worktrees"),
    ],
)
def test_regression_unknown_entries_are_removed(
    path, logged, owner, app, server, pushed, tmp_path, caplog
):
    planted = server.repo(app) / path
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text("planted\n")
    owner.git("clone", "-q", owner.url(app), str(tmp_path / "clone"))
    assert not planted.exists()
    assert removals(caplog, app) == [(logged, "removed")]


def test_regression_planted_attributes_are_put_back(owner, app, server, pushed, tmp_path, caplog):
    """info/attributes is the gateway's own (it turns off filters and export-subst)."""
    planted = server.repo(app) / "info" / "attributes"
    planted.write_text("* export-subst filter=ev\n")
    owner.git("clone", "-q", owner.url(app), str(tmp_path / "clone"))
    assert planted.read_bytes() == ATTRIBUTES
    assert removals(caplog, app) == [("info/attributes", "rewritten")]


# -- at start --


def test_regression_planted_while_stopped_is_removed_at_start(tmp_path, caplog):
    config = write_config(tmp_path / "gw")
    server = ServerThread(config).start()
    admin = Admin(config)
    admin.ok("user", "add", "alice")
    admin.ok("app", "create", "web", "--owner", "alice")
    admin.ok("app", "create", "other", "--owner", "alice")
    repo = server.repo("web")
    server.stop()
    marker = tmp_path / "ran"
    plant_hook(repo / "hooks" / "post-update", marker)
    plant_hook(repo / "hooks" / "pre-receive", marker)
    add_config(repo, "[core]", f"\tfsmonitor = touch {marker}")
    (repo / "objects" / "info" / "alternates").write_text(f"{server.repo('other')}/objects\n")
    (repo / "commondir").write_text(f"{server.repo('other')}\n")
    hooks_dir = server.repos / ".hooks"
    plant_hook(hooks_dir / "post-update", marker)
    caplog.clear()
    restarted = ServerThread(config).start()
    try:
        assert sorted(removals(caplog, "web")) == [
            ("commondir", "removed"),
            ("config", "rewritten"),
            ("hooks/post-update", "removed"),
            ("hooks/pre-receive", "removed"),
            ("objects/info/alternates", "removed"),
        ]
        assert removals(caplog, None) == [(".hooks/post-update", "removed")]
        assert removals(caplog, "other") == []
        assert list((repo / "hooks").iterdir()) == []
        assert sorted(p.name for p in hooks_dir.iterdir()) == [
            "pack-objects",
            "post-receive",
            "pre-receive",
        ]
        assert not marker.exists()
    finally:
        restarted.stop()
