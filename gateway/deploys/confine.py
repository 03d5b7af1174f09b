"""One deploy's limits beyond prlimit: its build-size watcher and, where cgroup v2 is delegated,
its own cgroup (joined before any of its code runs); and the lines `check` prints about them."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import executors
from ..config import size_text
from ..logs import q
from . import cgroups
from .buildsize import BuildWatch

log = logging.getLogger("gateway.deploys")


class Limits(Protocol):
    """What confinement reads of a deploy's limits (sandbox.Limits has them): the sandbox
    imports this module, so this one names only the fields it needs."""

    @property
    def memory(self) -> int: ...
    @property
    def processes(self) -> int: ...
    @property
    def tmp_size(self) -> int: ...
    @property
    def build_size(self) -> int: ...


# The sandbox's in-memory mounts and their sizes, as sandbox._bwrap_args makes them (a unit
# test holds the two together): what the watcher counts of them.
SHM_MAX = 64 * 1024 * 1024
RUN_SIZE = 1024 * 1024


def tmpfs_mounts(limits: Limits) -> dict[str, int]:
    return {
        "/tmp": limits.tmp_size,  # noqa: S108 - inside the sandbox
        "/dev/shm": min(limits.tmp_size, SHM_MAX),  # noqa: S108 - inside the sandbox
        "/run": RUN_SIZE,
    }


# A process started from Python cannot be created inside a cgroup (no clone3 with
# CLONE_INTO_CGROUP), and moving it after it started races its first fork: bwrap's children
# would stay outside. So the sandbox starts behind a gate: util-linux's `flock --no-fork`
# waits for a shared lock on a file that the gateway holds exclusively until it has moved the
# gate's pid into the cgroup; flock then execs prlimit (same pid), so every process of the
# deploy descends from one already inside. If the move fails, the gate is killed while still
# waiting: nothing of the deploy ran. flock is reachable by any sandbox user (the gateway's
# own interpreter may not be). With --no-fork, flock's descriptor on the lock stays open into
# the sandbox (and --close is refused with it; forking instead would put flock between the
# gateway and bwrap, and bwrap's --die-with-parent would watch flock): so the lock is an empty
# regular file of the gateway's, opened read-only (a directory's descriptor would let the
# deploy walk the host's tree with openat(fd, "..")), and counted by the watcher (a gateway
# not root owns it as the deploy's own user, who may reopen it for writing).


@dataclass
class Launch:
    """How to start one sandbox process: its argv and, behind the gate, the lock held."""

    argv: list[str]
    lock: int | None = None  # the gateway's descriptor holding the gate shut

    def open(self) -> None:
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock)  # releases the lock: the gate goes through
            self.lock = None


_delegation: cgroups.Delegation | str | None = None


def delegation() -> cgroups.Delegation | str:
    """This process's delegated cgroup subtree, or why there is none (looked up once)."""
    global _delegation
    if _delegation is None:
        _delegation = cgroups.detect()
    return _delegation


class Confinement:
    """The sandbox spawns each of a deploy's processes through `launch` and `started`."""

    def __init__(self, watch: BuildWatch, cgroup: cgroups.Cgroup | None) -> None:
        self.watch = watch
        self.cgroup = cgroup

    @classmethod
    async def start(cls, deploy_id: int, export_dir: Path, limits: Limits) -> Confinement:
        group = None
        found = await executors.run(delegation)
        if isinstance(found, cgroups.Delegation):
            try:
                group = await executors.run(
                    found.create, deploy_id, limits.memory, limits.processes
                )
            except (cgroups.CgroupError, OSError) as exc:
                # As on a host without delegation: the prlimit limits still hold.
                log.warning("event=cgroup_unavailable deploy=%d reason=%s", deploy_id, q(exc))
        watch = BuildWatch(export_dir, limits.build_size, tmpfs_mounts(limits))
        await watch.__aenter__()
        return cls(watch, group)

    def launch(self, argv: list[str]) -> Launch:
        """The argv to spawn (behind the gate if there is a cgroup to join); OSError if the
        gate cannot be shut."""
        if self.cgroup is None:
            return Launch(list(argv))
        flock = shutil.which("flock")
        if flock is None:
            raise OSError("flock not found (util-linux): cannot start a deploy in its cgroup")
        # In build_dir: only the gateway writes there (nothing can be planted in its place),
        # and the sandbox user can reach it. A fresh file per spawn, removed with the deploy.
        path = self.watch.export_dir.parent / f".gate-{secrets.token_hex(8)}"
        flags = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        lock = os.open(path, flags, 0o600)
        self.watch.extra_files.append(path)
        try:
            os.fchmod(lock, 0o644)  # the gateway's umask is 077; flock opens it read-only
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise
        return Launch([flock, "--no-fork", "--shared", str(path), *argv], lock)

    async def started(self, proc: asyncio.subprocess.Process, launch: Launch) -> None:
        """Move the new process into the cgroup, then let it run; OSError if it cannot be
        moved (it is killed at the gate: nothing runs outside the cgroup promised)."""
        if self.cgroup is not None and launch.lock is not None:
            try:
                await executors.run(self.cgroup.add, proc.pid)
            except cgroups.CgroupError as exc:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                launch.open()
                raise OSError(str(exc)) from None
            launch.open()
        self.watch.attach(proc)

    async def stopped(self) -> str:
        """Why the deploy was stopped or must fail ('' if it was not): the watcher's reason,
        after one last measurement, or an out-of-memory kill in its cgroup."""
        await self.watch.__aexit__(None, None, None)
        reason = await self.watch.check()
        if reason or self.cgroup is None:
            return reason
        events = await executors.run(self.cgroup.events)
        if events.get("memory.oom_kill"):
            return (
                "out of memory: the deploy's processes together used more than "
                "[deploy] max_memory (memory.max)"
            )
        return ""

    async def close(self) -> None:
        await self.watch.__aexit__(None, None, None)
        for path in self.watch.extra_files:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.cgroup is not None and not await executors.run(self.cgroup.remove):
            log.warning("event=cgroup_not_removed path=%s", q(str(self.cgroup.path)))


def report(build_sizes: Collection[int]) -> list[str]:
    """One line per deploy limit: enforced on this host, by what, or why not; given the
    max_build_size of each enabled sandbox (none: no line)."""
    if not build_sizes:
        return []
    sizes = sorted(set(build_sizes))
    lines = [
        "deploy limits: max_build_size "
        f"({', '.join(size_text(s) for s in sizes)}) enforced by a watcher: du of the export "
        "directory (each file at least 4 KiB), deleted files kept open or mapped and the "
        "in-memory /tmp and /dev/shm, about every second; a build can overshoot by what it "
        "writes in between",
        "deploy limits: max_cpu_seconds, max_memory, max_file_size, max_open_files enforced "
        "per process and max_processes per sandbox user by prlimit; /tmp and /dev/shm are "
        "tmpfs sized by max_tmp_size (memory)",
    ]
    found = delegation()
    if isinstance(found, cgroups.Delegation):
        lines.append(
            "deploy limits: memory.max (max_memory, for the whole deploy: shm, memfd and tmpfs "
            "included), memory.swap.max = 0 and pids.max (max_processes) enforced per deploy "
            f"by cgroup v2 under {found.base}"
        )
    else:
        lines += [
            f"deploy limits: memory.max not enforced: cgroup v2 not delegated ({found}); "
            "max_memory is RLIMIT_DATA per process (memfd and shm are not counted by "
            "RLIMIT_DATA)",
            "deploy limits: pids.max not enforced: cgroup v2 not delegated: max_processes is "
            "RLIMIT_NPROC, shared by every running deploy of one sandbox_user and every other "
            "process of that host user (give each app its own)",
        ]
    return lines
