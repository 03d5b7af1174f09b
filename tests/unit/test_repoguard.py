"""What a repository may hold: repoguard.enforce on real directories (no git needed)."""

from __future__ import annotations

import os
import threading
import time

from dulwich.repo import Repo

from gateway.git import hooks, repoguard
from gateway.git.repos import Repositories, config_text, git_settings


def make(tmp_path, max_input_size=1000):
    repos = Repositories(tmp_path / "repos", max_input_size)
    return repos, repos.create("web", "main")


def test_a_new_repository_is_already_clean(tmp_path):
    repos, path = make(tmp_path)
    assert (path / "config").read_bytes() == config_text(1000)
    assert repos.enforce("web") == []  # the gateway's hooks directory is created silently
    assert repos.enforce("web") == []


def test_config_of_repositories_made_by_earlier_versions_is_kept(tmp_path):
    """Earlier versions wrote the config with dulwich: the very same bytes, so an upgrade
    rewrites nothing and logs nothing."""
    repo = Repo.init_bare(str(tmp_path / "old.git"), mkdir=True, default_branch=b"main")
    config = repo.get_config()
    for key, value in git_settings(1000):
        section, _, name = key.rpartition(".")
        config.set(tuple(s.encode() for s in section.split(".", 1)), name.encode(), value.encode())
    config.write_to_path()
    repo.close()
    assert (tmp_path / "old.git" / "config").read_bytes() == config_text(1000)


def test_everything_not_allowed_is_removed(tmp_path):
    repos, path = make(tmp_path)
    (path / "hooks" / "post-update").write_text("#!/bin/sh\n")
    (path / "hooks" / "pre-receive.sample").write_text("")
    (path / "hooks" / "sub").mkdir()
    (path / "hooks" / "link").symlink_to("/bin/true")
    (path / "commondir").write_text("/elsewhere\n")
    (path / "worktrees" / "x").mkdir(parents=True)
    (path / "info" / "grafts").write_text("")
    (path / "objects" / "info" / "alternates").write_text("/elsewhere/objects\n")
    (path / "objects" / "info" / "http-alternates").write_text("")
    (path / "objects" / "pack" / "pack-x.pack").symlink_to("/elsewhere/pack-x.pack")
    (path / "refs" / "tags").rmdir()
    (path / "refs" / "tags").symlink_to("/elsewhere/refs/tags")
    (path / "refs" / "heads" / "deep").mkdir()
    (path / "refs" / "heads" / "deep" / "ref").symlink_to("/elsewhere/refs/heads/main")
    with open(path / "config", "a") as config:
        config.write("[include]\n\tpath = /elsewhere/config\n")
    changes = {(c.path, c.action) for c in repos.enforce("web")}
    assert changes == {
        ("hooks/post-update", "removed"),
        ("hooks/pre-receive.sample", "removed"),
        ("hooks/sub", "removed"),
        ("hooks/link", "removed"),
        ("commondir", "removed"),
        ("worktrees", "removed"),
        ("info/grafts", "removed"),
        ("objects/info/alternates", "removed"),
        ("objects/info/http-alternates", "removed"),
        ("objects/pack/pack-x.pack", "removed"),
        ("refs/tags", "removed"),
        ("refs/heads/deep/ref", "removed"),
        ("config", "rewritten"),
    }
    assert repos.enforce("web") == []
    assert list((path / "hooks").iterdir()) == []  # git takes hooks from <root>/.hooks only


def test_git_data_and_locks_are_left_alone(tmp_path):
    repos, path = make(tmp_path)
    for name in ("packed-refs", "packed-refs.lock", "gc.pid", "gc.log", "config.lock"):
        (path / name).write_text("")
    (path / "logs" / "refs" / "heads").mkdir(parents=True)
    (path / "logs" / "refs" / "heads" / "main").write_text("")
    (path / "objects" / "ab").mkdir()
    (path / "objects" / "info" / "commit-graph").write_text("")
    (path / "objects" / "info" / "commit-graphs").mkdir()
    (path / "objects" / "info" / "packs").write_text("")
    (path / "objects" / "tmp_objdir-incoming-x").mkdir()
    (path / "refs" / "heads" / "main.lock").write_text("")
    (path / "info" / "refs").write_text("")
    assert repos.enforce("web") == []


def test_a_planted_symlink_is_replaced_never_written_through(tmp_path):
    repos, path = make(tmp_path)
    repos.enforce_hooks_dir()
    victim = tmp_path / "victim-file"
    victim.write_text("precious\n")
    for link in (path / "config", repos.hooks_dir / "pre-receive", path / "hooks" / "update"):
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
    repos.enforce("web")
    assert victim.read_text() == "precious\n"
    assert not (path / "config").is_symlink()
    assert (path / "config").read_bytes() == config_text(1000)
    assert (repos.hooks_dir / "pre-receive").read_text() == hooks.script("pre-receive")
    assert not (path / "hooks" / "update").is_symlink()


def test_a_hard_linked_hook_is_replaced(tmp_path):
    """A second link would let its other path change the hook in place after the check."""
    repos, _ = make(tmp_path)
    repos.enforce_hooks_dir()
    hook = repos.hooks_dir / "pre-receive"
    os.link(hook, tmp_path / "other-link")
    assert [(c.path, c.action) for c in repos.enforce("web")] == [
        (".hooks/pre-receive", "rewritten")
    ]
    assert os.stat(hook).st_nlink == 1
    assert (tmp_path / "other-link").read_text() == hooks.script("pre-receive")  # untouched


def test_wrong_mode_is_rewritten(tmp_path):
    repos, _ = make(tmp_path)
    repos.enforce_hooks_dir()
    hook = repos.hooks_dir / "post-receive"
    hook.chmod(0o777)
    assert [(c.path, c.action) for c in repos.enforce("web")] == [
        (".hooks/post-receive", "rewritten")
    ]
    assert hook.stat().st_mode & 0o777 == 0o755


def test_a_fifo_in_place_of_the_config_does_not_hang(tmp_path):
    repos, path = make(tmp_path)
    (path / "config").unlink()
    os.mkfifo(path / "config")
    done = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: (result.append(repos.enforce("web")), done.set()))
    thread.start()
    assert done.wait(10)
    assert {(c.path, c.action) for c in result[0]} == {
        ("config", "removed"),
        ("config", "restored"),
    }


def test_structural_symlinks_are_removed(tmp_path):
    repos, path = make(tmp_path)
    other = repos.create("other", "main")
    (path / "hooks").rename(tmp_path / "old-hooks")
    (path / "hooks").symlink_to(other / "hooks")
    (path / "info").rename(tmp_path / "old-info")
    (path / "info").write_text("a file where a directory belongs\n")
    changes = [(c.path, c.action) for c in repos.enforce("web")]
    assert ("hooks", "removed") in changes and ("info", "removed") in changes
    assert (path / "hooks").is_dir() and not (path / "hooks").is_symlink()
    assert (path / "info").is_dir()
    assert repos.enforce("other") == []  # the link was removed, its target untouched


def test_earlier_gateway_files_are_updates_not_removals(tmp_path):
    """What an earlier version or configuration of the gateway wrote (hooks for another
    interpreter, hooks inside repositories, another max_input_size) is replaced or retired
    quietly (logged at info), not reported as planted."""
    repos, path = make(tmp_path)
    repos.enforce_hooks_dir()
    old_python = "/old/venv/bin/python"
    (repos.hooks_dir / "pre-receive").write_text(hooks.script("pre-receive", old_python))
    for name in hooks.HOOK_NAMES:  # versions before <root>/.hooks kept them in each repository
        (path / "hooks" / name).write_text(hooks.script(name, old_python))
        (path / "hooks" / name).chmod(0o755)
    newer = Repositories(tmp_path / "repos", 2000)  # [git] max_input_size changed
    changes = [(c.path, c.action) for c in newer.enforce("web")]
    assert sorted(changes) == [
        (".hooks/pre-receive", "updated"),
        ("config", "updated"),
        ("hooks/post-receive", "updated"),
        ("hooks/pre-receive", "updated"),
    ]
    assert (path / "config").read_bytes() == config_text(2000)
    assert list((path / "hooks").iterdir()) == []


def test_a_missing_repository_is_left_to_the_caller(tmp_path):
    repos = Repositories(tmp_path / "repos", 1000)
    repos.ensure_root()
    assert repoguard.enforce(repos.path_for("nothing"), repos.layout) == []


def test_a_stale_temp_file_is_removed_a_fresh_one_kept(tmp_path):
    repos, path = make(tmp_path)
    fresh = path / "hooks" / f"{repoguard.TEMP_PREFIX}pre-receive-1"
    stale = path / "hooks" / f"{repoguard.TEMP_PREFIX}pre-receive-2"
    fresh.write_text("")
    stale.write_text("")
    old = time.time() - 2 * repoguard.TEMP_GRACE
    os.utime(stale, (old, old))
    assert [(c.path, c.action) for c in repos.enforce("web")] == [
        (f"hooks/{stale.name}", "removed")
    ]
    assert fresh.exists()
