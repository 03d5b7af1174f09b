"""Hostile tenants against the pack-objects cache: entries are never shared between
repositories, the directory is private, and nothing planted in it is ever served."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from tests.e2e.test_pack_cache import Cached, cached_entry, clone, same_as_git_alone
from tests.helpers import Client


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    gateway = Cached(tmp_path_factory.mktemp("packcache-hostile"))
    yield gateway
    gateway.stop()


def tenant(cached: Cached, tmp, files: dict[str, str]) -> tuple[Client, str]:
    client = cached.user(tmp)
    app = cached.app(client)
    work = client.new_repo(tmp / f"work-{app}", files)
    client.git("push", "-q", client.url(app), "main", cwd=work)
    return client, app


SAME = {"README": "identical content in both tenants\n", "a.txt": "x" * 5000}


def test_regression_pack_cache_tenants_never_share_an_entry(cached, tmp_path):
    alice, alice_app = tenant(cached, tmp_path, SAME)
    bob, bob_app = tenant(cached, tmp_path, SAME)
    head = alice.git("ls-remote", alice.url(alice_app), "refs/heads/main").stdout.split()[0]
    # The very same commit in both repositories: only the repository tells the requests apart.
    assert bob.git("ls-remote", bob.url(bob_app), "refs/heads/main").stdout.split()[0] == head
    alice_entry = cached_entry(cached, alice, alice_app, tmp_path)
    runs, reports, hits = cached.runs(), cached.reports(), cached.count("hit")
    same_as_git_alone(cached.server, bob_app, clone(bob, bob_app, tmp_path / "bob"), tmp_path)
    cached.wait_reports(reports + 1)
    assert cached.runs() == runs + 1  # bob's own pack-objects, never alice's answer
    assert cached.count("hit") == hits
    bob_entry = cached_entry(cached, bob, bob_app, tmp_path)
    assert bob_entry != alice_entry


def test_regression_pack_cache_entry_moved_to_another_tenant_is_refused(cached, tmp_path, caplog):
    alice, alice_app = tenant(cached, tmp_path, {"secret": "alice's code\n"})
    bob, bob_app = tenant(cached, tmp_path, {"README": "bob's code\n"})
    alice_entry = cached_entry(cached, alice, alice_app, tmp_path)
    bob_entry = cached_entry(cached, bob, bob_app, tmp_path)
    # Alice's answer under Bob's key: a valid pack with a valid checksum, for another key.
    shutil.copyfile(alice_entry, bob_entry)
    reports = cached.reports()
    target = clone(bob, bob_app, tmp_path / "bob")
    same_as_git_alone(cached.server, bob_app, target, tmp_path)
    cached.wait_reports(reports + 1)
    assert "written for another key" in caplog.text
    assert not (target / "secret").exists()


@pytest.mark.parametrize("plant", ["symlink", "foreign_owner", "hard_link"])
def test_regression_pack_cache_planted_entry_is_not_served(cached, tmp_path, caplog, plant):
    owner, app = tenant(cached, tmp_path, {"README": f"planted {plant}\n"})
    entry = cached_entry(cached, owner, app, tmp_path)
    # Each plant holds a perfectly valid answer: only where it comes from is wrong.
    if plant == "symlink":
        outside = tmp_path / "valid-entry"
        shutil.copyfile(entry, outside)
        entry.unlink()
        entry.symlink_to(outside)
    elif plant == "foreign_owner":
        os.chown(entry, 65534, 65534)
    else:
        os.link(entry, cached.cache / "entries" / ".other-name")
    reports, hits = cached.reports(), cached.count("hit")
    same_as_git_alone(cached.server, app, clone(owner, app, tmp_path / "after"), tmp_path)
    cached.wait_reports(reports + 1)
    assert cached.count("hit") == hits
    assert "event=pack_cache_bad_entry" in caplog.text
    # Removed (never followed), then rewritten by the gateway's own run of git.
    fresh = os.lstat(entry)
    assert stat.S_ISREG(fresh.st_mode)
    assert (fresh.st_uid, fresh.st_nlink) == (os.geteuid(), 1)
    if plant == "symlink":
        assert (tmp_path / "valid-entry").exists()
    if plant == "hard_link":
        (cached.cache / "entries" / ".other-name").unlink()


def test_regression_pack_cache_dir_is_private(cached, tmp_path, caplog):
    owner, app = tenant(cached, tmp_path, {"README": "private\n"})
    entry = cached_entry(cached, owner, app, tmp_path)
    assert stat.S_IMODE(cached.cache.stat().st_mode) == 0o700
    for part in ("entries", "spool", "seen"):
        assert stat.S_IMODE((cached.cache / part).stat().st_mode) == 0o700
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    # Widened by mistake: the hooks stop using it (other users could read or plant).
    cached.cache.chmod(0o755)
    try:
        reports, bypass = cached.reports(), cached.count("bypass")
        same_as_git_alone(cached.server, app, clone(owner, app, tmp_path / "wide"), tmp_path)
        cached.wait_reports(reports + 1)
        assert cached.count("bypass") == bypass + 1
        assert "event=pack_cache_unusable" in caplog.text
    finally:
        cached.cache.chmod(0o700)
