"""The build-size accounting on real files and processes: what `du` counts (blocks, hard
links once, any depth), what /proc shows of deleted files still held, and the watcher."""

from __future__ import annotations

import asyncio
import itertools
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.deploys import buildsize
from gateway.deploys.builddir import remove_tree

MIB = 1024 * 1024


def fill(path: Path, size: int = MIB) -> None:
    path.write_bytes(os.urandom(size))


def tree(root: Path) -> int:
    return asyncio.run(buildsize.tree_usage(root))[0]


def test_sparse_files_count_their_blocks_not_their_size(tmp_path):
    with (tmp_path / "sparse").open("wb") as out:
        out.truncate(512 * MIB)
    assert tree(tmp_path) < MIB


def test_hard_links_count_once(tmp_path):
    fill(tmp_path / "original")
    for i in range(20):
        os.link(tmp_path / "original", tmp_path / f"link-{i}")
    assert MIB <= tree(tmp_path) < 2 * MIB


def test_a_tree_deeper_than_path_max_is_measured(tmp_path):
    """Paths beyond PATH_MAX (60 levels of 200-byte names: 12 KB); the megabyte at the
    bottom still counts."""
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(60):
            os.mkdir("d" * 200, dir_fd=fd)
            deeper = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        out = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(out, os.urandom(MIB))
        os.close(out)
    finally:
        os.close(fd)
    try:
        assert tree(root) >= MIB
    finally:
        remove_tree(root)


def test_deleted_files_held_open_or_mapped_are_counted(tmp_path):
    dev = tmp_path.stat().st_dev
    held = (tmp_path / "held").open("wb+")
    held.write(os.urandom(MIB))
    held.flush()
    os.unlink(tmp_path / "held")
    fd = os.open(tmp_path / "mapped", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 2 * MIB)
    area = mmap.mmap(fd, 2 * MIB)
    os.close(fd)
    os.unlink(tmp_path / "mapped")
    area[:] = os.urandom(2 * MIB)
    try:
        found = buildsize.unlinked_usage([os.getpid()], dev)
        assert 3 * MIB <= found < 4 * MIB
        assert buildsize.tree_usage is not None and tree(tmp_path) < MIB  # du cannot see them
        assert buildsize.unlinked_usage([os.getpid()], dev + 1) == 0  # another device
    finally:
        held.close()
        area.close()
    assert buildsize.unlinked_usage([os.getpid()], dev) == 0


def test_descendants_follow_the_whole_process_tree():
    code = (
        "import subprocess,sys,time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    grandchild = 0
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        assert buildsize.descendants([parent.pid]) == [parent.pid, grandchild]
    finally:
        if grandchild:
            os.kill(grandchild, 9)
        parent.kill()
        parent.wait(timeout=10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_the_watcher_stops_a_deploy_over_the_limit(tmp_path):
    async def scenario() -> tuple[str, int | None]:
        fill(tmp_path / "out", 2 * MIB)
        proc = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)
        watch = buildsize.BuildWatch(tmp_path, MIB, {})
        async with watch:
            watch.attach(proc)
            code = await asyncio.wait_for(proc.wait(), 30)
        return watch.stopped, code

    reason, code = asyncio.run(scenario())
    assert reason == buildsize.over_line(MIB)
    assert reason == ("the build wrote more than 1 MiB (export and /tmp) ([deploy] max_build_size)")
    assert code == -9


def test_the_watcher_leaves_a_deploy_within_the_limit(tmp_path):
    async def scenario() -> str:
        fill(tmp_path / "out", MIB // 2)
        async with buildsize.BuildWatch(tmp_path, MIB, {}, interval=0.01) as watch:
            await asyncio.sleep(0.2)
        return await watch.check()

    assert asyncio.run(scenario()) == ""


def test_a_tree_kept_unreadable_stops_the_deploy_after_a_grace(tmp_path, monkeypatch):
    """A gateway that is not root cannot read what the build hid behind a mode-000
    directory: tolerated for UNREADABLE_GRACE, then the deploy stops."""

    async def hidden(root: Path) -> tuple[int, str]:
        return 0, "du: cannot read directory '/x/hidden': Permission denied"

    monkeypatch.setattr(buildsize, "tree_usage", hidden)
    monkeypatch.setattr(buildsize, "UNREADABLE_GRACE", 0.05)

    async def scenario() -> list[str]:
        watch = buildsize.BuildWatch(tmp_path, MIB, {})
        first = await watch.check()
        await asyncio.sleep(0.1)
        return [first, await watch.check()]

    first, later = asyncio.run(scenario())
    assert first == ""
    assert later.startswith("the build keeps part of its files unreadable")
    assert "cannot read directory '/x/hidden'" in later and "max_build_size" in later


@pytest.mark.parametrize("tmp_size", [64 * MIB, 512 * MIB, 3 * MIB + 1])
def test_tmpfs_sizes_match_the_sandbox(tmp_size):
    """The watcher recognises the sandbox's tmpfs mounts by their size: the sizes it expects
    are the ones sandbox._bwrap_args gives them."""
    from gateway.deploys import confine
    from gateway.deploys.network import Network
    from gateway.deploys.sandbox import Limits, Sandbox, _Binds

    limits = Limits(1, 1, 1, 1, 1, tmp_size, 1)
    box = Sandbox("bubblewrap", (), (), Network("none"), None, limits, "bwrap", "prlimit")
    binds = _Binds()
    try:
        args = box._bwrap_args(binds, Path("/nonexistent"), Network("none"))
    finally:
        binds.close()
    mounted = {
        args[i + 3]: int(args[i + 1])
        for i in range(len(args) - 3)
        if args[i] == "--size" and args[i + 2] == "--tmpfs"
    }
    assert mounted == confine.tmpfs_mounts(limits)


def test_a_slow_measurement_is_repeated_less_often(tmp_path, monkeypatch):
    """The watcher spends at most DUTY of a core: a measurement taking 50 ms is followed by
    450 ms of rest, whatever the poll interval."""
    calls = []

    async def slow(root: Path) -> tuple[int, str]:
        calls.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.05)
        return 0, ""

    monkeypatch.setattr(buildsize, "tree_usage", slow)

    async def scenario() -> None:
        async with buildsize.BuildWatch(tmp_path, MIB, {}, interval=0.001):
            await asyncio.sleep(1.2)

    asyncio.run(scenario())
    assert 2 <= len(calls) <= 4
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(calls))


def test_the_gates_lock_files_count_too(tmp_path):
    """A gateway that is not root owns the cgroup gate's lock file as the deploy's user, who
    holds a descriptor of it: what it writes there counts."""
    export, lock = tmp_path / "export", tmp_path / ".gate-0"
    export.mkdir()
    fill(lock, 2 * MIB)

    async def scenario() -> str:
        return await buildsize.BuildWatch(export, MIB, {}, extra_files=[lock]).check()

    assert asyncio.run(scenario()) == buildsize.over_line(MIB)


def test_empty_files_count_one_block_each(tmp_path):
    """An empty file takes no block; it still takes an inode (on disk) or kernel memory (in a
    tmpfs): each counts INODE_SIZE, so 300 of them are over a megabyte."""
    for i in range(300):
        (tmp_path / str(i)).touch()
    assert tree(tmp_path) >= 300 * buildsize.INODE_SIZE


def test_a_proc_scan_past_its_deadline_stops(tmp_path):
    """The scan checks its deadline between processes: a deploy that makes it slow (tens of
    thousands of mappings per process) is stopped rather than measured minutes apart."""
    dev = os.stat(tmp_path).st_dev
    with pytest.raises(buildsize.MeasureTimeout, match="processes could not be measured"):
        buildsize.unlinked_usage([os.getpid()], dev, deadline=0.0)
    assert buildsize.unlinked_usage([os.getpid()], dev) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="/proc/PID/map_files needs CAP_SYS_ADMIN")
def test_a_deleted_file_mapped_one_page_counts_its_blocks(tmp_path):
    """Written with write(), then one page of it mapped, closed and deleted: the mapping shows
    4 KiB, the file still takes a megabyte."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    path = tmp_path / "paged"
    fill(path)
    fd = os.open(path, os.O_RDONLY)
    address = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    os.close(fd)
    path.unlink()
    try:
        assert buildsize.unlinked_usage([os.getpid()], os.stat(tmp_path).st_dev) >= MIB
    finally:
        libc.munmap(address, 4096)


def test_a_threads_own_descriptor_table_is_read(tmp_path):
    """A thread that unshared its descriptor table holds a deleted megabyte the process's
    /proc/PID/fd does not show; threads sharing the table are not read twice."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    ready, done = threading.Event(), threading.Event()

    def hold() -> None:
        assert libc.unshare(0x400) == 0  # CLONE_FILES
        fd = os.open(tmp_path / "held", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(MIB))
        os.unlink(tmp_path / "held")
        ready.set()
        done.wait(30)
        os.close(fd)

    holder = threading.Thread(target=hold)
    sharing = threading.Thread(target=done.wait, args=(30,))
    holder.start()
    sharing.start()
    try:
        assert ready.wait(10)
        assert buildsize._own_tables(Path("/proc"), os.getpid()) == [holder.native_id]
        assert buildsize.unlinked_usage([os.getpid()], os.stat(tmp_path).st_dev) >= MIB
    finally:
        done.set()
        holder.join()
        sharing.join()
