"""Bare repositories on disk: safe paths, creation with settings, trash."""

from __future__ import annotations

import os
import subprocess

import pytest

from gateway.errors import AccessDenied, Conflict, InvalidName
from gateway.git.repos import Repositories


def git_config(path, key):
    env = {"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(
        ["git", "config", "--get", key],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()


def test_create_sets_head_and_settings(tmp_path):
    repos = Repositories(tmp_path / "repos", 12345)
    path = repos.create("web", "master")
    assert path == (tmp_path / "repos" / "web.git").resolve()
    assert (path / "HEAD").read_text().strip() == "ref: refs/heads/master"
    assert repos.head_branch("web") == "master"
    assert git_config(path, "receive.fsckObjects") == "true"
    assert git_config(path, "receive.maxInputSize") == "12345"
    assert git_config(path, "receive.fsck.zeroPaddedFilemode") == "warn"
    assert git_config(path, "core.bare") == "true"
    assert repos.exists("web")
    assert not any(p.name.startswith(".new-") for p in repos.root.iterdir())
    with pytest.raises(Conflict):
        repos.create("web", "main")


@pytest.mark.parametrize("name", ["../x", "x/y", ".hidden", "UPPER", "", "a" * 64, "x\x00"])
def test_names_are_validated(tmp_path, name):
    repos = Repositories(tmp_path, 1)
    with pytest.raises(InvalidName):
        repos.path_for(name)


def test_symlink_out_of_root_is_refused(tmp_path):
    root = tmp_path / "repos"
    root.mkdir()
    (tmp_path / "elsewhere.git").mkdir()
    (root / "evil.git").symlink_to(tmp_path / "elsewhere.git")
    with pytest.raises(AccessDenied):
        Repositories(root, 1).path_for("evil")


def test_sibling_prefix_is_not_under_root(tmp_path):
    (tmp_path / "repos").mkdir()
    (tmp_path / "repos-evil").mkdir()
    repos = Repositories(tmp_path / "repos", 1)
    assert repos.path_for("app").parent == (tmp_path / "repos").resolve()


def test_bad_branch_refused(tmp_path):
    with pytest.raises(InvalidName):
        Repositories(tmp_path, 1).create("web", "bad..branch")


def test_trash_keeps_the_repository(tmp_path):
    repos = Repositories(tmp_path / "repos", 1)
    repos.create("web", "main")
    first = repos.trash("web")
    assert not (tmp_path / "repos" / "web.git").exists()
    assert (first / "HEAD").is_file()
    assert first.parent.parent == repos.root / ".trash"
    repos.create("web", "main")
    second = repos.trash("web")
    assert second != first and (second / "HEAD").is_file()


def test_stale_quarantines_are_removed(tmp_path):
    import time

    repos = Repositories(tmp_path / "repos", 1)
    path = repos.create("web", "main")
    fresh = path / "objects" / "tmp_objdir-incoming-fresh"
    stale = path / "objects" / "tmp_objdir-incoming-stale"
    for quarantine in (fresh, stale):
        (quarantine / "ab").mkdir(parents=True)
        (quarantine / "ab" / "cdef").write_bytes(b"x")
    old = time.time() - 7200
    for item in (stale, stale / "ab", stale / "ab" / "cdef"):
        os.utime(item, (old, old))
    assert repos.remove_stale_quarantines("web", 3600) == 1
    assert fresh.exists() and not stale.exists()


def test_hooks_of_earlier_versions_count_as_generated():
    """An upgrade rewrites the hooks (now started with -IS, without site's start-up): what
    the previous version wrote is recognized as the gateway's own, not as tampering; an
    edited hook is not."""
    from gateway.git import hooks
    from gateway.git.repos import generated_earlier

    for name in hooks.HOOK_NAMES:
        assert hooks.script(name, "/opt/py/bin/python").startswith("#!/opt/py/bin/python -IS\n")
        for isolation in ("-IS", "-I"):
            for push_options in (True, False):  # before push options, and since
                old = hooks.script(name, "/old/venv/bin/python", isolation, push_options)
                assert generated_earlier(name, old.encode())
                assert not generated_earlier(name, old.encode() + b"import os\n")


def test_config_before_push_options_counts_as_generated():
    """Repositories of versions before push options lack receive.advertisePushOptions: an
    upgrade adds it quietly; a config with anything else changed is not the gateway's."""
    from gateway.git.repos import config_text, generated_earlier

    old = config_text(1000, push_options=False)
    assert b"advertisePushOptions" not in old and b"advertisePushOptions" in config_text(1000)
    assert generated_earlier("config", old)
    assert not generated_earlier(
        "config", old.replace(b"fsckObjects = true", b"fsckObjects = false")
    )


def test_pack_hook_of_the_flat_layout_counts_as_generated():
    """Before the layer packages the pack-objects hook imported `gateway.packhook`: an
    upgrade rewrites it quietly (not reported as planted); an edited one is not the gateway's."""
    from gateway.git import packhook
    from gateway.git.repos import generated_earlier

    old = packhook.script("/old/venv/bin/python", "/old/site", packhook.EARLIER_MODULE)
    assert "from gateway.packhook import main" in old
    assert generated_earlier(packhook.HOOK_NAME, old.encode())
    assert generated_earlier(packhook.HOOK_NAME, packhook.script("/py", "/site").encode())
    assert not generated_earlier(packhook.HOOK_NAME, old.encode() + b"import os\n")
