"""Hostile tenants against the pack-objects cache: entries are never shared between
repositories, the directory is private, nothing planted in it is ever served, and clients
that stop reading never hold more disk than its cap."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import time

import pytest

from gateway.git import packhook
from tests.e2e.test_pack_cache import Cached, cached_entry, clone, same_as_git_alone
from tests.helpers import TIMEOUT, Client
from tests.unit.test_packhook import blocked_writing, disk_held


@pytest.fixture(scope="module")
def cached(module_gateways, tmp_path_factory):
    return Cached(module_gateways, tmp_path_factory.mktemp("packcache-hostile"))


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


def hooks_running() -> list[int]:
    """The pack-objects hooks running now (each fetch's, started by its upload-pack)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        # python -IS <repos>/.hooks/pack-objects git pack-objects ...
        if len(argv) > 2 and argv[1] == b"-IS" and argv[2].endswith(b"/.hooks/pack-objects"):
            pids.append(int(pid))
    return pids


def pkt(line: str) -> bytes:
    return f"{len(line) + 4:04x}{line}".encode()


@pytest.mark.slow
def test_regression_pack_cache_stalled_clients_never_hold_more_than_the_cap(
    gateway_factory, tmp_path
):
    """The review's attack: eight fetches of distinct 15 MiB packs (raw upload-pack over
    SSH) whose clients never read, against a 20 MiB cache. Each leader spools at
    pack-objects' pace and keeps what it spooled (removed or not) to feed its client: all
    of it stays within the cap while they stall (before: 120 MiB, on disk until
    idle_timeout), counted from /proc; once they are gone, so are their bytes."""
    cap = 20 * 1024 * 1024
    cached = Cached(gateway_factory, tmp_path / "gw", git={"pack_cache_max_size": "20M"})
    clients = []
    try:
        owner = cached.user(tmp_path)
        app = cached.app(owner)
        work = owner.new_repo(tmp_path / "work", {"README": "big\n"})
        rng = random.Random(20)  # noqa: S311 - test content, not a secret
        for i in range(15):  # incompressible: a 15 MiB pack
            (work / f"blob{i:02d}").write_bytes(rng.randbytes(1024 * 1024))
        owner.commit(work, {"big": "15 MiB\n"}, "big")
        for i in range(8):  # the same 15 MiB, eight distinct wants (keys)
            owner.git("checkout", "-q", "-b", f"b{i}", "main", cwd=work)
            owner.commit(work, {f"only-b{i}": f"{i}\n"}, f"b{i}")
        owner.git("push", "-q", owner.url(app), "refs/heads/*:refs/heads/*", cwd=work)
        heads = {
            line.split()[1]: line.split()[0]
            for line in owner.git("ls-remote", owner.url(app)).stdout.splitlines()
        }
        before = set(hooks_running())
        for i in range(8):
            request = pkt(f"want {heads[f'refs/heads/b{i}']}\n") + b"0000" + pkt("done\n")
            read, write = os.pipe()  # our end is never read
            proc = subprocess.Popen(
                [*owner.ssh_base, "-T", "git@127.0.0.1", f"git-upload-pack '{app}.git'"],
                env=owner.env,
                stdin=subprocess.PIPE,
                stdout=write,
                stderr=subprocess.DEVNULL,
            )
            os.close(write)
            clients.append((proc, read))
            proc.stdin.write(request)
            proc.stdin.close()
        peak, deadline = 0, time.monotonic() + TIMEOUT

        def stalled() -> bool:
            hooks = set(hooks_running()) - before
            return len(hooks) == 8 and all(blocked_writing(pid) for pid in hooks)

        while not stalled():  # every fetch's pack-objects hook waits on its client
            assert time.monotonic() < deadline, "the fetches never all stalled"
            peak = max(peak, disk_held(cached.cache))
            time.sleep(0.05)
        for _ in range(20):  # and while they stall
            peak = max(peak, disk_held(cached.cache))
            time.sleep(0.05)
        assert 0 < peak <= cap, f"{peak / 2**20:.1f} MiB on disk, cap 20 MiB"
        accounting = packhook.Cache(str(cached.cache), cap, 300)
        try:  # the cache's own count agrees (it counts claims too, so never less)
            assert disk_held(cached.cache) <= accounting.usage() <= cap
        finally:
            accounting.close()
        for proc, read in clients:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
            os.close(read)
        clients = []
        cached.server.wait_until(lambda: not set(hooks_running()) - before)
        # The next fetch sweeps what killed runs left; nothing else stays.
        same_as_git_alone(cached.server, app, clone(owner, app, tmp_path / "after"), tmp_path)
        assert list((cached.cache / "spool").iterdir()) == []
        assert list((cached.cache / "gone").iterdir()) == []
        kept = [*cached.entries(), cached.cache / "lock"]  # the lock file holds the budget
        assert disk_held(cached.cache) == sum(p.stat().st_blocks * 512 for p in kept)
    finally:
        for proc, read in clients:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
            os.close(read)
        cached.stop()


def test_regression_pack_cache_markers_stay_bounded_under_distinct_fetches(
    gateway_factory, tmp_path
):
    """Each distinct request leaves a marker in seen/ (so that its second request keeps the
    answer): a tenant fetching ever new wants cannot grow the directory past
    [git] pack_cache_max_markers."""
    cached = Cached(gateway_factory, tmp_path / "gw", git={"pack_cache_max_markers": 4})
    try:
        owner = cached.user(tmp_path)
        app = cached.app(owner)
        work = owner.new_repo(tmp_path / "work", {"README": "markers\n"})
        for i in range(12):
            owner.commit(work, {f"f{i}": f"{i}\n"}, f"commit {i}")
            owner.git("tag", f"t{i}", cwd=work)
        owner.git("push", "-q", owner.url(app), "main", "--tags", cwd=work)
        tags = [
            line.split()[0]
            for line in owner.git("ls-remote", "--tags", owner.url(app)).stdout.splitlines()
        ]
        assert len(tags) == 12
        seen = cached.cache / "seen"
        for number, want in enumerate(tags, start=1):  # twelve distinct requests
            request = pkt(f"want {want}\n") + b"0000" + pkt("done\n")
            result = subprocess.run(
                [*owner.ssh_base, "-T", "git@127.0.0.1", f"git-upload-pack '{app}.git'"],
                env=owner.env,
                input=request,
                capture_output=True,
                timeout=TIMEOUT,
            )
            assert result.returncode == 0, result.stderr
            assert b"PACK" in result.stdout
            cached.wait_reports(number)
            assert len(list(seen.iterdir())) <= 4
    finally:
        cached.stop()
