"""The build-size watcher: what a running deploy has written, against [deploy] max_build_size.

Why a watcher. A size-limited tmpfs (bwrap's `--size`) would bound the export, but in
memory, not on disk: a 4 GiB build would need 4 GiB of RAM. A filesystem quota (XFS project
quotas, a loop device per deploy) needs root and a filesystem prepared for it on every host.
A watcher needs neither; its cost is that it measures every so often, so a build can overshoot
by what it writes between two measurements (about a second; longer for a tree of millions of
files, see DUTY), and it is stopped then.

What it counts, each deploy on its own:
- the export directory on disk, measured by coreutils `du -s -x`: allocated blocks (a sparse
  file counts what it really takes, not its apparent size), every hard-linked inode once, any
  depth of tree with a bounded number of descriptors, never following a link, in a process
  of its own (the event loop never waits on it); each file, directory or link counts at
  least INODE_SIZE (4 KiB), so empty files are no way around the cap;
- files deleted from it while a process of the deploy keeps them open or mapped (invisible to
  `du`): found through /proc/PID/fd (and /proc/PID/task/TID/fd of threads with a table of
  their own) and /proc/PID/maps of the deploy's processes, counted by
  their allocated blocks (open, or mapped and closed: through /proc/PID/map_files, where the
  gateway runs as root; otherwise by the extent of their mapping);
- the sandbox's in-memory /tmp and /dev/shm (tmpfs: they take memory, not disk, each already
  capped by max_tmp_size): their used size from statfs through /proc/PID/root, deleted but
  open files included, or INODE_SIZE per inode used if that is more.
Not counted: the operator's sandbox_write_paths (shared on purpose), memfd (memory: see
cgroups.py, memory.max), and deleted files whose last descriptor is in flight in a unix
socket (SCM_RIGHTS) rather than in a process: no /proc entry shows those; the kernel bounds
them by the sender's RLIMIT_NOFILE per user, so at most max_open_files files of up to
max_file_size each (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import platform
import re
import signal
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import executors
from ..config import size_text
from ..logs import q

log = logging.getLogger("gateway.deploys")

# Seconds between two measurements, at least.
POLL_INTERVAL = 1.0
# The share of one core a watcher may spend measuring, on average: after a measurement that
# took t seconds it waits t * (1 / DUTY - 1), so a tree of millions of files is measured less
# often rather than keeping a core busy.
DUTY = 0.1
# A tree `du` cannot walk in this long (tens of millions of files) stops the deploy: its size
# cannot be known, and such a tree is itself the abuse (inodes are a shared resource too).
MEASURE_TIMEOUT = 120.0
# The deploy's processes must be scanned (/proc: their descriptors and mappings) in this
# long, or the deploy is stopped. A build can make the scan slow on purpose: a process may
# hold 65530 mappings, for kernel memory only (100 processes of 30000: 4.7 s here); and DUTY
# then spaces measurements out (9 s of rest per second spent), a window to write past the
# cap unseen, while the scan holds a core of the gateway. A real build's takes milliseconds.
SCAN_TIMEOUT = 10.0
# A directory the build made unreadable hides what is under it from `du` run as the build's
# own user (a root gateway reads everything): tolerated this long (a test suite checking
# permission errors), then the deploy is stopped.
UNREADABLE_GRACE = 30.0
SETTING = "[deploy] max_build_size"
# What each file, directory or link counts at least. An empty file takes no block, so a
# count of blocks alone let a build make millions of them for nothing: the inodes of the
# export's filesystem (shared with every other deploy, and perhaps the repositories and the
# registry) and, in the in-memory /tmp, /dev/shm and /run, kernel memory that no size
# limit of a tmpfs counts (each has its own inode limit, half the host's RAM in pages).
# One block per inode leaves real trees as they were (a file with content takes a block).
INODE_SIZE = 4096


def over_line(limit: int) -> str:
    """The reason a deploy over the cap is stopped (the log says `deploy stopped: ...`)."""
    return f"the build wrote more than {size_text(limit)} (export and /tmp) ({SETTING})"


@dataclass
class Usage:
    """One measurement, in bytes."""

    tree: int = 0
    unlinked: int = 0
    tmpfs: int = 0
    unreadable: str = ""  # what `du` could not read, if anything

    @property
    def total(self) -> int:
        return self.tree + self.unlinked + self.tmpfs


# -- the export directory --


class MeasureTimeout(Exception):
    """`du` did not finish in MEASURE_TIMEOUT, or the /proc scan in SCAN_TIMEOUT: why."""


async def tree_usage(root: Path) -> tuple[int, str]:
    """Bytes charged for what is under `root`: its allocated blocks (hard links once, sparse
    files by their blocks) or INODE_SIZE per file, directory or link if that is more; and
    the first thing `du` could not read ('' if none). Files vanishing during the walk (the
    build is running) are not an error: the total is of what was there."""
    blocks, err = await _du(root, "-B1")
    inodes, _ = await _du(root, "--inodes")
    denied = [line for line in err.splitlines() if "Permission denied" in line]
    return max(blocks, inodes * INODE_SIZE), denied[0][:300] if denied else ""


async def _du(root: Path, unit: str) -> tuple[int, str]:
    """`du -s -x` of `root` in `unit` (-B1: bytes, --inodes: inodes), and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        "du",
        "-s",
        "-x",
        unit,
        "--",
        str(root),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.defpath, "LC_ALL": "C"},
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), MEASURE_TIMEOUT)
    except TimeoutError:
        raise MeasureTimeout(
            f"the build's files could not be measured in {MEASURE_TIMEOUT:g} s (too many files)"
        ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)
    first = out.split(b"\t", 1)[0].strip()
    if not first.isdigit():
        raise OSError(f"du printed no size for {root}: {err.decode('utf-8', 'replace')[:200]}")
    return int(first), err.decode("utf-8", "replace")


# -- the deploy's processes --


def descendants(roots: Iterable[int], proc: Path = Path("/proc")) -> list[int]:
    """`roots` and every process below them (a sandbox's processes all descend from its
    bwrap: its PID namespace reparents orphans to its own init), from one pass over /proc."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(proc):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            # `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            fields = text[text.rfind(")") + 2 :].split()
            if len(fields) > 1 and fields[1].isdigit():
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    seen: set[int] = set()
    stack = [pid for pid in roots if pid > 0]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


_MAPS_LINE = re.compile(r"([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+) ")


def unlinked_usage(
    pids: Iterable[int], dev: int, proc: Path = Path("/proc"), deadline: float = math.inf
) -> int:
    """Bytes of files on device `dev` that have no name left but that a process in `pids`
    still holds: open (by their allocated blocks) or mapped after closing (by how far their
    mappings reach, the most they can have written through them). Each inode once.
    MeasureTimeout once past `deadline` (time.monotonic)."""
    sizes: dict[int, int] = {}
    major, minor = os.major(dev), os.minor(dev)
    for pid in pids:
        if time.monotonic() > deadline:
            raise MeasureTimeout(_scan_timeout())
        if not _held_open(proc / str(pid) / "fd", dev, sizes):
            continue  # gone meanwhile
        # A thread may have a descriptor table of its own (unshare(CLONE_FILES), or clone
        # without CLONE_FILES), which /proc/PID/fd does not show: 40 files of 512 KiB held
        # in four such threads passed a 5 MiB cap unseen. Each such table is read too.
        for tid in _own_tables(proc, pid):
            if time.monotonic() > deadline:
                raise MeasureTimeout(_scan_timeout())
            _held_open(proc / str(pid) / "task" / str(tid) / "fd", dev, sizes)
        try:
            maps = (proc / str(pid) / "maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            if not line.endswith(" (deleted)"):
                continue  # the usual case, without the cost of the expression
            found = _MAPS_LINE.match(line)
            if found is None:
                continue
            start, end, offset, dmaj, dmin, ino = found.groups()
            if (int(dmaj, 16), int(dmin, 16)) != (major, minor):
                continue
            reach = int(offset, 16) + int(end, 16) - int(start, 16)
            taken = _mapped_blocks(proc / str(pid) / "map_files", start, end, dev)
            sizes[int(ino)] = max(sizes.get(int(ino), 0), reach, taken)
    return sum(sizes.values())


def _scan_timeout() -> str:
    return (
        f"the build's processes could not be measured in {SCAN_TIMEOUT:g} s (too many "
        "processes, threads, descriptors or mappings)"
    )


def _held_open(fd_dir: Path, dev: int, sizes: dict[int, int]) -> bool:
    """Add the deleted regular files on `dev` open in one descriptor table to `sizes`
    (inode -> allocated bytes); False if the table cannot be listed (the task is gone)."""
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            info = os.stat(fd_dir / name)  # the open file itself, through the magic link
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 0 and info.st_dev == dev:
            sizes[info.st_ino] = max(sizes.get(info.st_ino, 0), info.st_blocks * 512)
    return True


# kcmp(2), which tells whether two tasks share their descriptor table, by architecture;
# where it is unknown or refused, every thread's table is read (slower, as correct).
_KCMP = {"x86_64": 312, "aarch64": 272}
_KCMP_FILES = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _own_tables(proc: Path, pid: int) -> list[int]:
    """The threads of process `pid` whose descriptor table is not the process's own."""
    try:
        tids = [int(name) for name in os.listdir(proc / str(pid) / "task") if name.isdigit()]
    except OSError:
        return []
    number = _KCMP.get(platform.machine())
    others = []
    for tid in tids:
        if tid == pid:
            continue
        if number is not None and proc == Path("/proc"):
            shared = _libc.syscall(number, pid, tid, _KCMP_FILES, 0, 0) == 0
            if shared:
                continue
        others.append(tid)
    return others


def _mapped_blocks(map_files: Path, start: str, end: str, dev: int) -> int:
    """The blocks of the whole file behind one mapping, through /proc/PID/map_files (0 if
    not readable: it takes CAP_SYS_ADMIN, which a gateway not run as root lacks).

    The extent of a mapping is not enough: a file written with write() and then mapped one
    page at a time keeps all its blocks while its mapping shows 4 KiB (40 files of 512 KiB
    passed a 5 MiB cap so, and a process may hold 65530 mappings)."""
    try:
        info = os.stat(map_files / f"{int(start, 16):x}-{int(end, 16):x}")
    except OSError:
        return 0
    return info.st_blocks * 512 if info.st_dev == dev else 0


def tmpfs_usage(pids: Iterable[int], mounts: dict[str, int], proc: Path = Path("/proc")) -> int:
    """Bytes used in the sandboxes' own tmpfs mounts ({"/tmp": size, ...}), read through the
    root of a process inside each (another mount namespace than ours). A mount counts only if
    its total size is the one the sandbox gave it: while bwrap sets up, or once it is gone,
    the path may still lead to the host's own directory."""
    try:
        ours = os.readlink(proc / "self" / "ns" / "mnt")
    except OSError:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    used: dict[int, int] = {}
    for pid in pids:
        try:
            if os.readlink(proc / str(pid) / "ns" / "mnt") == ours:
                continue
        except OSError:
            continue
        for path, size in mounts.items():
            where = proc / str(pid) / "root" / path.lstrip("/")
            try:
                info = os.statvfs(where)
                device = os.stat(where).st_dev
            except OSError:
                continue
            if info.f_blocks * info.f_frsize != -(-size // page) * page:
                continue
            # Empty files take memory too (INODE_SIZE): each counts at least that.
            inodes = (info.f_files - info.f_ffree) * INODE_SIZE
            used[device] = max((info.f_blocks - info.f_bfree) * info.f_frsize, inodes)
    return sum(used.values())


def process_usage(roots: list[int], dev: int, mounts: dict[str, int]) -> tuple[int, int]:
    """(unlinked, tmpfs) bytes of the processes under `roots` (blocking: run off the loop)."""
    deadline = time.monotonic() + SCAN_TIMEOUT
    pids = descendants(roots)
    return unlinked_usage(pids, dev, deadline=deadline), tmpfs_usage(pids, mounts)


def _blocks(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += os.lstat(path).st_blocks * 512
    return total


# -- the watcher --


@dataclass
class BuildWatch:
    """Measures one deploy while it runs and kills it once over `limit`.

    Sandboxed processes are attached as they start (`attach`); `stopped` then holds the
    reason, and the caller fails the deploy with it."""

    export_dir: Path
    limit: int
    tmpfs: dict[str, int]
    interval: float = POLL_INTERVAL
    stopped: str = ""
    # Files of the gateway's outside the export that a deploy holds open and could write
    # (the cgroup gate's lock files, see confine.py): counted too.
    extra_files: list[Path] = field(default_factory=list)
    _procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _unreadable_since: float | None = None
    _dev: int = 0

    async def __aenter__(self) -> BuildWatch:
        self._dev = (await executors.run(os.stat, self.export_dir)).st_dev
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def attach(self, proc: asyncio.subprocess.Process) -> None:
        self._procs = [p for p in self._procs if p.returncode is None] + [proc]

    async def measure(self) -> Usage:
        tree, unreadable = await tree_usage(self.export_dir)
        if self.extra_files:
            tree += await executors.run(_blocks, list(self.extra_files))
        roots = [p.pid for p in self._procs if p.returncode is None]
        unlinked, tmpfs = (0, 0)
        if roots:
            unlinked, tmpfs = await executors.run(process_usage, roots, self._dev, self.tmpfs)
        return Usage(tree, unlinked, tmpfs, unreadable)

    async def check(self) -> str:
        """Measure once now; the reason to stop ('' if within bounds). Also the last check
        once the command is over: a build that wrote fast and exited still fails."""
        if self.stopped:
            return self.stopped
        loop = asyncio.get_running_loop()
        try:
            usage = await self.measure()
        except MeasureTimeout as exc:
            return self._stop(f"{exc} ({SETTING})")
        except OSError as exc:
            log.warning(
                "event=build_size_unmeasured path=%s reason=%s", q(str(self.export_dir)), q(exc)
            )
            return ""
        if usage.total > self.limit:
            log.info(
                "event=build_size_exceeded path=%s tree=%d unlinked=%d tmpfs=%d limit=%d",
                q(str(self.export_dir)),
                usage.tree,
                usage.unlinked,
                usage.tmpfs,
                self.limit,
            )
            return self._stop(over_line(self.limit))
        if not usage.unreadable:
            self._unreadable_since = None
        elif self._unreadable_since is None:
            self._unreadable_since = loop.time()
        elif loop.time() - self._unreadable_since > UNREADABLE_GRACE:
            return self._stop(
                f"the build keeps part of its files unreadable, so their size cannot be "
                f"measured ({usage.unreadable.removeprefix('du: ')}) ({SETTING})"
            )
        return ""

    def _stop(self, reason: str) -> str:
        self.stopped = reason
        for proc in self._procs:
            if proc.returncode is None:
                # The sandbox's outer bwrap leads its process group; its death takes the
                # whole sandbox with it (--die-with-parent, then the PID namespace).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        return reason

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.stopped:
                started = loop.time()
                if await self.check():
                    return
                spent = loop.time() - started
                await asyncio.sleep(max(self.interval, spent * (1 / DUTY - 1)))
        except Exception:
            # A watcher that cannot watch must not leave the deploy unbounded.
            log.exception("event=build_size_watch_failed path=%s", q(str(self.export_dir)))
            self._stop(f"the build's size could not be measured ({SETTING})")
