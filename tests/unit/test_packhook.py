"""The pack cache's pure parts: which commands the hook runs, what the key covers, what an
entry must be, and how the directory is prepared."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
from pathlib import Path

import pytest

from gateway import config
from gateway.git import packcache, packhook

WANT = b"1585959f8eae2db54c150a273dec7b847b517c2d\n"


def test_hook_runs_only_pack_objects_with_the_gateways_git():
    argv = ["git", "pack-objects", "--revs", "--stdout"]
    assert packhook.pack_objects_argv(argv, "/usr/bin/git") == ["/usr/bin/git", *argv[1:]]
    shallow = ["git", "--shallow-file", "", "pack-objects", "--revs"]
    assert packhook.pack_objects_argv(shallow, "/g")[:4] == [
        "/g",
        "--shallow-file",
        "",
        "pack-objects",
    ]
    for bad in (
        ["sh", "pack-objects"],
        ["git", "upload-pack", "."],
        ["git", "--shallow-file", "/etc/x", "pack-objects"],
        ["git", "-c", "core.pager=x", "pack-objects"],
        [],
    ):
        with pytest.raises(ValueError):
            packhook.pack_objects_argv(bad, "/g")


def test_key_covers_repository_arguments_and_request_but_not_progress():
    base = packhook.request_key("/r/a.git", ["git", "pack-objects", "--revs"], WANT)
    assert base != packhook.request_key("/r/b.git", ["git", "pack-objects", "--revs"], WANT)
    filtered = ["git", "pack-objects", "--revs", "--filter=blob:none"]
    assert base != packhook.request_key("/r/a.git", filtered, WANT)
    assert base != packhook.request_key(
        "/r/a.git", ["git", "pack-objects", "--revs"], b"--shallow x\n" + WANT
    )
    progress = ["git", "pack-objects", "--revs", "--progress"]
    assert base == packhook.request_key("/r/a.git", progress, WANT)


def entry(key: str, pack: bytes) -> bytes:
    digest = hashlib.sha256(bytes.fromhex(key) + pack).digest()
    return pack + packhook.trailer(key, len(pack), digest)


def test_entry_must_match_its_key_length_and_checksum():
    key, other = "a" * 64, "b" * 64
    good = entry(key, b"PACK" + b"x" * 100)
    assert packhook.verify_bytes(good, key) == 104
    for bad, why in (
        (good, "another key"),
        (good[:50], "truncated"),
        (good[:60] + b"y" + good[61:], "checksum"),
        (good[:-1], "truncated"),
    ):
        with pytest.raises(ValueError, match=why):
            packhook.verify_bytes(bad, other if why == "another key" else key)


def test_prepare_makes_the_directory_private(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    packcache.prepare(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for part in packhook.SUBDIRS:
        assert stat.S_IMODE((directory / part).stat().st_mode) == 0o700
    assert (directory / packhook.LOCK).is_file()


def test_prepare_refuses_a_symlink_or_a_foreign_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="not a directory"):
        packcache.prepare(link)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ValueError, match="uid 65534"):
            packcache.prepare(foreign)


def test_hook_path_with_shell_characters_leaves_the_cache_off(tmp_path):
    settings = config.from_mapping({"git": {"pack_cache_dir": str(tmp_path / "c")}}).git
    cache = packcache.PackCache(
        settings, "/usr/bin/git", Path("/srv/my repos/.hooks/x"), tmp_path / "s"
    )
    asyncio.run(cache.start(None))
    assert not cache.enabled
    assert cache.upload_pack_config() == [] and cache.environment() == {}


def test_default_directory_is_beside_the_control_socket(tmp_path):
    cfg = config.from_mapping({"storage": {"control_socket": str(tmp_path / "gw.sock")}})
    assert cfg.git.pack_cache_dir == tmp_path / "gw.sock.pack-cache"


def test_cache_dir_is_never_bound_into_a_deploy_sandbox(tmp_path):
    with pytest.raises(config.ConfigError, match="pack_cache_dir"):
        config.from_mapping(
            {
                "git": {"pack_cache_dir": str(tmp_path / "cache")},
                "deploy": {"sandbox_read_paths": [str(tmp_path)]},
            }
        )


def test_report_json_round_trips_hostile_text():
    """The hook writes its report without the json module; whatever a reason or key holds
    (quotes, backslashes, control characters, lone surrogates from a path), the gateway's
    json.loads reads back exactly what was sent."""
    import json

    message = {
        "result": "miss",
        "served": 0,
        "written": 12,
        "problems": [{"event": "pack_cache_write_failed", "reason": 'a"b\\c\n\x00\x1f\udcff é'}],
    }
    assert json.loads(packhook.to_json(message)) == message
    with pytest.raises(TypeError):
        packhook.to_json({"x": 1.5})


def test_hook_does_not_import_heavy_modules():
    """Start-up is the hook's cost on every fetch: it must not import json, subprocess,
    socket or contextlib (16 ms here), nor the gateway's other modules."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gateway.git.packhook;"
        "print(' '.join(sorted(sys.modules)))"
    )
    root = str(Path(packhook.__file__).parents[2])
    out = subprocess.run(
        [sys.executable, "-IS", "-c", code, root],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    heavy = {"json", "subprocess", "socket", "contextlib", "asyncio", "signal", "logging"}
    assert not heavy & set(out)
    assert [m for m in out if m.startswith("gateway")] == [
        "gateway",
        "gateway.git",
        "gateway.git.packhook",
    ]


def test_child_restores_sigpipe_and_reports_exit_codes(tmp_path):
    """git under the hook dies of a closed pipe as under upload-pack (SIGPIPE at its
    default, not Python's ignore), and exit codes come back as subprocess reports them."""
    import sys

    # Python sets SIGPIPE to ignored in any Python child, so ask the kernel about grep.
    child = packhook.Child(["grep", "^SigIgn:", "/proc/self/status"], capture=True)
    child.close_stdin()
    ignored = int(os.read(child.stdout, 200).split()[1], 16)
    assert child.wait() == 0
    assert not ignored & (1 << (13 - 1))  # SIGPIPE is 13
    echo = packhook.Child(
        [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read())"], capture=True
    )
    echo.feed(b"hello")
    echo.close_stdin()
    assert os.read(echo.stdout, 100) == b"hello"
    assert echo.wait() == 0
    sleeper = packhook.Child([sys.executable, "-c", "import time; time.sleep(60)"], capture=False)
    sleeper.kill()
    assert sleeper.wait() == -9


def test_copy_range_sends_the_range_and_refuses_a_short_file(tmp_path):
    source = tmp_path / "entry"
    source.write_bytes(bytes(range(256)) * 5000)
    fd = os.open(source, os.O_RDONLY)
    read, write = os.pipe()
    try:
        packhook.copy_range(fd, 10, 1010, write)
        assert os.read(read, 5000) == (bytes(range(256)) * 5000)[10:1010]
        with pytest.raises(ValueError, match="truncated"):
            packhook.copy_range(fd, 1_279_000, 1_290_000, write)  # the file ends at 1,280,000
    finally:
        for each in (fd, read, write):
            os.close(each)


def _repository(tmp_path: Path) -> tuple[Path, str, dict[str, str]]:
    """A bare repository whose pack is far larger than a pipe (incompressible blobs)."""
    import random
    import shutil
    import subprocess

    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", str(work)], env=env, check=True, timeout=30)
    rng = random.Random(7)  # noqa: S311 - test content, not a secret
    for i in range(8):
        (work / f"blob{i}").write_bytes(rng.randbytes(128 * 1024))
    for argv in (["git", "add", "-A"], ["git", "commit", "-qm", "blobs"]):
        subprocess.run(argv, cwd=work, env=env, check=True, timeout=30)
    repo = tmp_path / "repo.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(work), str(repo)], env=env, check=True, timeout=30
    )
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=repo,
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout.strip()
    cache = tmp_path / "cache"
    packcache.prepare(cache)
    env.update(
        {
            packhook.DIR_ENV: str(cache),
            packhook.MAX_SIZE_ENV: str(64 * 1024 * 1024),
            packhook.MAX_AGE_ENV: "300",
            packhook.GIT_ENV: shutil.which("git") or "/usr/bin/git",
            "GIT_DIR": str(repo),
        }
    )
    return cache, head, env


HOOK_ARGV = ["git", "pack-objects", "--revs", "--thin", "--stdout", "--delta-base-offset"]


def test_regression_a_stalled_leader_client_never_holds_up_the_followers(tmp_path):
    """A tenant leads a popular fetch and stops reading (its pipe full): the run still
    reaches the spool at pack-objects' pace, so an identical fetch completes meanwhile,
    and the stalled client gets the same bytes once it reads again."""
    import subprocess
    import sys
    import time

    cache, head, env = _repository(tmp_path)
    hook = [sys.executable, "-IS", packhook.__file__, *HOOK_ARGV]
    stalled_read, stalled_write = os.pipe()
    leader = subprocess.Popen(hook, stdin=subprocess.PIPE, stdout=stalled_write, env=env)
    os.close(stalled_write)
    try:
        leader.stdin.write(f"{head}\n".encode())
        leader.stdin.close()
        # The leader has published its spool once its record lock and spool exist.
        deadline = time.monotonic() + 30
        while not any((cache / packhook.SPOOL).iterdir()):
            assert time.monotonic() < deadline, "the leader never started its spool"
            time.sleep(0.01)
        follower = subprocess.run(
            hook, input=f"{head}\n".encode(), capture_output=True, env=env, timeout=60
        )
        assert follower.returncode == 0, follower.stderr
        assert len(follower.stdout) > 1024 * 1024  # much more than the stalled pipe holds
        assert leader.poll() is None  # the leader still waits on its client
        received = bytearray()
        while chunk := os.read(stalled_read, 1 << 20):
            received += chunk
        assert leader.wait(timeout=60) == 0
        assert bytes(received) == follower.stdout
        # Asked for twice: kept.
        assert len(list((cache / packhook.ENTRIES).iterdir())) == 1
    finally:
        os.close(stalled_read)
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_regression_a_pack_larger_than_the_cache_is_sent_whole_without_a_spool(tmp_path):
    """max_size bounds a spool while it is written, not only when it is kept: a pack that
    outgrows it stops being spooled (no disk filled by one huge fetch) and the client still
    gets every byte, the same as from git alone."""
    import subprocess
    import sys

    cache, head, env = _repository(tmp_path)
    env[packhook.MAX_SIZE_ENV] = str(300 * 1024)  # the pack is about 1 MiB
    hook = [sys.executable, "-IS", packhook.__file__, *HOOK_ARGV]
    plain = subprocess.run(
        ["git", *HOOK_ARGV[1:]],
        input=f"{head}\n".encode(),
        capture_output=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    for _ in range(2):  # the second time, the key was asked for before
        result = subprocess.run(
            hook, input=f"{head}\n".encode(), capture_output=True, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert len(result.stdout) == len(plain) and result.stdout[-20:] == plain[-20:]
    assert list((cache / packhook.ENTRIES).iterdir()) == []
    assert list((cache / packhook.SPOOL).iterdir()) == []


def disk_held(directory: Path) -> int:
    """Bytes on disk (st_blocks) of every file under directory, whether still linked or
    only held open by some process after it was removed: summed once per inode. An
    independent check: it reads /proc, not the cache's own accounting."""
    inodes: dict[tuple[int, int], int] = {}
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                inodes[info.st_dev, info.st_ino] = info.st_blocks * 512
    prefix = f"{directory}/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            with contextlib.suppress(OSError):
                if os.readlink(link).startswith(prefix):
                    info = os.stat(link)
                    if stat.S_ISREG(info.st_mode):
                        inodes[info.st_dev, info.st_ino] = info.st_blocks * 512
    return sum(inodes.values())


def blocked_writing(pid: int) -> bool:
    """The process sleeps writing into a full pipe (its reader stalled)."""
    try:
        with open(f"/proc/{pid}/wchan") as wchan:
            return "writ" in wchan.read()  # pipe_write, pipe_wait_writable...
    except OSError:
        return False


MiB = 1024 * 1024


def lock_bytes(directory: Path) -> int:
    return (directory / packhook.LOCK).stat().st_blocks * 512


def test_cache_counts_a_removed_file_until_its_last_reader_closes(tmp_path):
    directory = tmp_path / "cache"
    packcache.prepare(directory)
    cache = packhook.Cache(str(directory), 4 * MiB, 300)
    try:
        spool = directory / packhook.SPOOL / ("ab" * 32)
        spool.write_bytes(os.urandom(3 * MiB))
        reader = os.open(spool, os.O_RDONLY)
        assert packhook.hold(reader)
        assert cache.retire(packhook.SPOOL, spool.name) is not None  # still read: parked
        assert not spool.exists()
        assert cache.usage() >= 3 * MiB
        claim = packhook.Claim()
        assert not cache.reserve(claim, 0, 2 * MiB)  # 3 MiB held of 4: no room
        assert cache.reserve(claim, 0, MiB // 2)
        assert cache.usage() <= 4 * MiB
        claim.drop(cache)
        os.close(reader)
        cache.reap(claims=True)  # its last reader is done: so are its bytes
        assert list((directory / packhook.GONE).iterdir()) == []
        assert cache.usage() == lock_bytes(directory)  # only the budget's block
        # Read by nobody: removed at once.
        spool.write_bytes(b"x" * 4096)
        assert cache.retire(packhook.SPOOL, spool.name) is None
        assert cache.usage() == lock_bytes(directory)  # only the budget's block
    finally:
        cache.close()


def test_cache_evicts_entries_for_a_spool_but_never_unlinks_one_being_read(tmp_path):
    directory = tmp_path / "cache"
    packcache.prepare(directory)
    cache = packhook.Cache(str(directory), 4 * MiB, 300)
    try:
        entries = directory / packhook.ENTRIES
        older, newer = entries / ("a1" * 32), entries / ("b2" * 32)
        for age, path in ((20, older), (10, newer)):
            path.write_bytes(os.urandom(2 * MiB))
            stamp = os.stat(path).st_mtime - age
            os.utime(path, (stamp, stamp))
        served = os.open(older, os.O_RDONLY)  # the oldest, still being sent
        assert packhook.hold(served)
        claim = packhook.Claim()
        assert not cache.reserve(claim, 0, 3 * MiB)  # only the newer one could go
        assert list(entries.iterdir()) == []
        (parked,) = set((directory / packhook.GONE).iterdir()) - {directory / "gone" / claim.name}
        assert parked.name.startswith(older.name) and cache.usage() >= 2 * MiB
        os.close(served)
        assert cache.reserve(claim, 0, 3 * MiB)
        assert list((directory / packhook.GONE).iterdir()) == [directory / "gone" / claim.name]
        claim.drop(cache)
    finally:
        cache.close()


def test_regression_seen_markers_stay_bounded_under_distinct_requests(tmp_path):
    directory = tmp_path / "cache"
    packcache.prepare(directory)
    cache = packhook.Cache(str(directory), 4 * MiB, 300, max_markers=40)
    try:
        trims = []
        real_trim = cache._trim_markers
        cache._trim_markers = lambda: trims.append(1) or real_trim()  # type: ignore[method-assign]
        keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]
        for key in keys:
            cache.mark_seen(key)
            assert len(os.listdir(directory / packhook.SEEN)) <= 40
        # Counted, not listed, at each new key: a trim per ten new keys (a quarter of 40).
        assert len(trims) <= 1000 // 10 + 1
        # The least recently asked went first: the last requests are remembered.
        assert cache.mark_seen(keys[-1])[0]
        assert not cache.mark_seen(keys[0])[0]
    finally:
        cache.close()


def test_regression_stalled_clients_never_hold_more_than_the_cap(tmp_path):
    """The review's attack, scaled down: eight distinct fetches of a 1 MiB pack whose
    clients never read, against a 1.5 MiB cache. Each leader spools at pack-objects' pace
    and keeps what it spooled (removed or not) to feed its client: all of it must fit in
    the cap, counted on disk from /proc, while they stall; each client still gets its
    whole pack once it reads, and nothing is left behind."""
    import subprocess
    import sys
    import time

    cache, head, env = _repository(tmp_path)
    cap = 3 * MiB // 2
    env[packhook.MAX_SIZE_ENV] = str(cap)
    request = f"{head}\n".encode()
    plain = subprocess.run(
        ["git", *HOOK_ARGV[1:]], input=request, capture_output=True, env=env, timeout=60
    ).stdout
    assert cap // 2 < len(plain) < cap  # one pack fits, two do not
    hook = [sys.executable, "-IS", packhook.__file__, *HOOK_ARGV]
    hooks, pipes = [], []
    try:
        for i in range(8):
            read, write = os.pipe()
            pipes.append(read)
            # Another git setting per fetch: another key, the same pack.
            each = {**env, "GIT_CONFIG_PARAMETERS": f"'gateway.probe'='{i}'"}
            hooks.append(subprocess.Popen(hook, stdin=subprocess.PIPE, stdout=write, env=each))
            os.close(write)
            hooks[-1].stdin.write(request)
            hooks[-1].stdin.close()
        peak, deadline = 0, time.monotonic() + 60
        while not all(blocked_writing(h.pid) for h in hooks):  # all stalled on their clients
            assert time.monotonic() < deadline, "the hooks never all stalled"
            peak = max(peak, disk_held(cache))
            time.sleep(0.02)
        for _ in range(10):  # and while they stall
            peak = max(peak, disk_held(cache))
            time.sleep(0.02)
        assert 0 < peak <= cap, f"{peak} bytes on disk, cap {cap}"
        accounted = packhook.Cache(str(cache), cap, 300)
        try:
            assert accounted.usage() <= cap
        finally:
            accounted.close()
        for proc, read in zip(hooks, pipes, strict=True):
            received = bytearray()
            while chunk := os.read(read, 1 << 20):
                received += chunk
            assert proc.wait(timeout=60) == 0
            assert len(received) == len(plain) and received[-20:] == plain[-20:]
        for part in (packhook.SPOOL, packhook.GONE, packhook.ENTRIES):
            assert list((cache / part).iterdir()) == []
        assert disk_held(cache) == (cache / packhook.LOCK).stat().st_blocks * 512  # the budget
    finally:
        for read in pipes:
            os.close(read)
        for proc in hooks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_regression_seen_markers_stay_bounded_under_a_flood_of_fetches(tmp_path):
    """Every distinct request leaves a marker (to keep its answer if it comes again): a
    flood of distinct fetches, each through the real hook, never leaves more than the cap."""
    import subprocess
    import sys

    cache, head, env = _repository(tmp_path)
    env[packhook.MAX_MARKERS_ENV] = "8"
    hook = [sys.executable, "-IS", packhook.__file__, *HOOK_ARGV]
    request = f"{head}\n--not\n{head}\n".encode()  # an empty pack: the flood is quick
    for i in range(40):
        each = {**env, "GIT_CONFIG_PARAMETERS": f"'gateway.probe'='{i}'"}  # another key
        result = subprocess.run(hook, input=request, capture_output=True, env=each, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(b"PACK")
        assert len(os.listdir(cache / packhook.SEEN)) <= 8


def test_budget_counts_the_cache_only_when_its_bound_says_full(tmp_path):
    """Most reservations read one number (an upper bound kept in the lock file) rather
    than listing every entry: a miss on a cache of thousands of entries stays cheap."""
    directory = tmp_path / "cache"
    packcache.prepare(directory)
    cache = packhook.Cache(str(directory), 16 * MiB, 300)
    try:
        for i in range(50):
            (directory / packhook.ENTRIES / f"{i:064x}").write_bytes(b"x" * 8192)
        counts = []
        real_usage = cache.usage
        cache.usage = lambda: counts.append(1) or real_usage()  # type: ignore[method-assign]
        for _ in range(20):  # twenty small misses: 100 KB spooled each, the rest given back
            claim = packhook.Claim()
            assert cache.reserve(claim, 0, 300 * 1024)
            claim.drop(cache, 100_000)
        assert len(counts) == 1
        assert cache._ledger() == 50 * 8192 + 20 * 25 * 4096  # 100 KB take 25 pages
        # A bound past max_size is only a bound: the next reservation counts for real.
        cache._set_ledger(16 * MiB)
        claim = packhook.Claim()
        assert cache.reserve(claim, 0, MiB)
        assert len(counts) == 2
        assert cache._ledger() == 50 * 8192 + lock_bytes(directory) + claim.size
        claim.drop(cache, 0)
    finally:
        cache.close()


def test_regression_removing_a_planted_fifo_or_symlink_never_blocks_or_follows(tmp_path):
    directory = tmp_path / "cache"
    packcache.prepare(directory)
    cache = packhook.Cache(str(directory), 4 * MiB, 300)
    try:
        entries = directory / packhook.ENTRIES
        os.mkfifo(entries / ("f0" * 32))
        outside = tmp_path / "outside"
        outside.write_bytes(b"not the cache's")
        (entries / ("5e" * 32)).symlink_to(outside)
        assert cache.retire(packhook.ENTRIES, "f0" * 32) is None  # no reader: no wait
        assert cache.retire(packhook.ENTRIES, "5e" * 32) is None
        assert list(entries.iterdir()) == []
        assert outside.read_bytes() == b"not the cache's"
    finally:
        cache.close()
