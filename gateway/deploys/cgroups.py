"""Per-deploy cgroups, where cgroup v2 is delegated to the gateway: memory.max (shm, memfd and
tmpfs pages included, which RLIMIT_DATA misses), memory.swap.max and pids.max for the deploy as
a whole, and every one of its processes killed at the end (cgroup.kill).

Delegated means: the gateway's own cgroup ("0::/path" in /proc/self/cgroup) lies on a cgroup2
filesystem at /sys/fs/cgroup, offers the memory and pids controllers, and the gateway may
write its cgroup.subtree_control (systemd: `Delegate=yes`). cgroup v2 lets a cgroup hand
controllers to its children only while it holds no process itself, so the gateway's processes
first move into a leaf of their own, `gateway/`, and each deploy gets a sibling, `deploy-ID-*`.
Anywhere else (cgroup v1 or hybrid hosts, no delegation) `detect` says why, and the deploys
keep their prlimit limits only.

Everything here is blocking file work on a small pseudo-filesystem: run it off the loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PROC_SELF = Path("/proc/self/cgroup")
CONTROLLERS = ("memory", "pids")
LEAF = "gateway"
REMOVE_TIMEOUT = 10.0


class CgroupError(Exception):
    """A cgroup could not be set up or used: one line saying why."""


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, text: str) -> None:
    # No O_CREAT: every file written here is one the kernel makes; a missing one is an error.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _mkdir(path: Path) -> None:
    """Create a cgroup (the kernel fills in its files). Tests replace it."""
    path.mkdir(mode=0o755)


def _rmdir(path: Path) -> None:
    """Remove an empty cgroup (its files go with it). Tests replace it."""
    path.rmdir()


@dataclass(frozen=True)
class Delegation:
    """The cgroup subtree the gateway may manage: `base` is its own cgroup."""

    base: Path

    def prepare(self) -> None:
        """Move the gateway's processes into `base/gateway` and enable the controllers for
        base's children; idempotent (every worker process may call it)."""
        enabled = _read(self.base / "cgroup.subtree_control").split()
        if all(name in enabled for name in CONTROLLERS):
            return
        leaf = self.base / LEAF
        try:
            _mkdir(leaf)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"cannot create {leaf}: {exc.strerror or exc}") from None
        for pid in _read(self.base / "cgroup.procs").split():
            try:
                _write(leaf / "cgroup.procs", pid)
            except ProcessLookupError:
                continue  # exited meanwhile
            except OSError as exc:
                raise CgroupError(
                    f"cannot move process {pid} into {leaf}: {exc.strerror or exc}"
                ) from None
        try:
            _write(self.base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        except OSError as exc:
            raise CgroupError(
                f"cannot enable {', '.join(CONTROLLERS)} in {self.base}: {exc.strerror or exc}"
            ) from None

    def create(self, deploy_id: int, memory: int, processes: int) -> Cgroup:
        """A new cgroup for one deploy, with its limits set; CgroupError if it cannot be."""
        self.prepare()
        path = self.base / f"deploy-{deploy_id}-{secrets.token_hex(4)}"
        try:
            _mkdir(path)
        except OSError as exc:
            raise CgroupError(f"cannot create {path}: {exc.strerror or exc}") from None
        group = Cgroup(path)
        try:
            _write(path / "memory.max", str(memory))
            # No swap: memory.max is then the deploy's real bound, and a deploy swapping
            # would slow every other one on the host.
            group.write_optional("memory.swap.max", "0")
            _write(path / "pids.max", str(processes))
            # An out-of-memory kill takes the whole deploy, not one process of it at random.
            group.write_optional("memory.oom.group", "1")
        except OSError as exc:
            group.remove()
            raise CgroupError(f"cannot set the limits of {path}: {exc.strerror or exc}") from None
        return group


@dataclass(frozen=True)
class Cgroup:
    """One deploy's cgroup."""

    path: Path

    def write_optional(self, name: str, text: str) -> None:
        """Write a file that only some kernels have (swap accounting, oom.group, kill)."""
        if (self.path / name).exists():
            _write(self.path / name, text)

    def add(self, pid: int) -> None:
        """Move process `pid` (with no child yet: it inherits nothing) into this cgroup."""
        try:
            _write(self.path / "cgroup.procs", str(pid))
        except OSError as exc:
            raise CgroupError(
                f"cannot move process {pid} into {self.path}: {exc.strerror or exc}"
            ) from None

    def events(self) -> dict[str, int]:
        """The counters that explain a failure: oom_kill (memory.events), max (pids.events)."""
        found = {}
        for name, key in (("memory.events", "oom_kill"), ("pids.events", "max")):
            with contextlib.suppress(OSError, ValueError):
                for line in _read(self.path / name).splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == key:
                        found[f"{name.split('.')[0]}.{key}"] = int(parts[1])
        return found

    def kill(self) -> None:
        """SIGKILL every process in it (cgroup.kill, Linux 5.14+; else one by one)."""
        if (self.path / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.path / "cgroup.kill", "1")
                return
        for _ in range(100):  # forks racing the loop are caught by the next pass
            try:
                pids = _read(self.path / "cgroup.procs").split()
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def remove(self, timeout: float = REMOVE_TIMEOUT) -> bool:
        """Kill what is left and remove the cgroup; whether it is gone."""
        self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                _rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                # EBUSY until the killed processes have exited (no event reaches a thread
                # for that): retried with a deadline.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
            time.sleep(0.02)


def detect(root: Path = ROOT, proc_self: Path = PROC_SELF) -> Delegation | str:
    """The subtree delegated to this process, or the reason there is none (a phrase)."""
    try:
        lines = _read(proc_self).splitlines()
    except OSError as exc:
        return f"cannot read {proc_self}: {exc.strerror or exc}"
    paths = [line[3:] for line in lines if line.startswith("0::")]
    if not paths:
        return "no cgroup v2 hierarchy: a cgroup v1 host"
    if not (root / "cgroup.controllers").is_file():
        return f"{root} is not a cgroup2 filesystem: a cgroup v1 or hybrid host"
    base = root / paths[0].strip().lstrip("/")
    if base.name == LEAF:
        # Already moved into our leaf by an earlier `prepare` (this or a parent process).
        base = base.parent
    if base == root and not (root / "memory.max").exists():
        # The host's real root cgroup (it alone has no memory.max): every process of the
        # host is there, kernel threads included; never the gateway's to reorganise. (In a
        # container with its own cgroup namespace, "/" is the container's cgroup: fine.)
        return f"the gateway runs in the root cgroup of {root}, not in one delegated to it"
    try:
        offered = _read(base / "cgroup.controllers").split()
    except OSError as exc:
        return f"cannot read {base / 'cgroup.controllers'}: {exc.strerror or exc}"
    missing = [name for name in CONTROLLERS if name not in offered]
    if missing:
        return f"the gateway's cgroup {base} lacks the {' and '.join(missing)} controller"
    for name in ("cgroup.subtree_control", "cgroup.procs"):
        if not os.access(base / name, os.W_OK):
            return (
                f"the gateway's cgroup {base} is not delegated to it: {name} is not writable "
                "(systemd: Delegate=yes)"
            )
    if not os.access(base, os.W_OK | os.X_OK):
        return f"the gateway's cgroup {base} is not delegated to it: cannot create cgroups there"
    return Delegation(base)
