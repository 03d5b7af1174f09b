"""A deploy's place on disk: the build directory (safe from other local users, reachable by
the sandbox user), each export directory given to that user, and its removal whatever a
build left in it."""

from __future__ import annotations

import logging
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..logs import q

log = logging.getLogger("gateway.deploys")


class SandboxError(ConfigError):
    """The sandbox cannot be built as configured: one line saying why and what to do."""


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account a sandbox runs as when the gateway is root."""

    uid: int
    gid: int
    name: str


def prepare(build_dir: Path, run_as: RunAs | None) -> list[Path]:
    """Create the build directory (blocking) and let the sandbox user walk to it: bwrap
    mounts the export by path as that user. A directory on the way that the gateway's
    own user owns gets search permission for that user (never read: nobody can list
    it); the changed ones are returned, for the caller to say so. A home directory, or
    one owned by someone else, is left as it is: SandboxError names it and the fix."""
    build_dir.mkdir(parents=True, exist_ok=True)
    check_owned(build_dir)
    if run_as is None:
        return []
    changed = []
    target = build_dir.resolve()
    for directory in (target, *target.parents):
        info = directory.stat()
        needed = _search_bit(info, run_as)
        if info.st_mode & needed:
            continue
        if info.st_uid != os.geteuid() or directory == Path("/") or _is_home(directory):
            raise SandboxError(
                f"deploy sandbox: the sandbox user '{run_as.name}' cannot reach "
                f"[deploy] build_dir ({target}): {directory} is not searchable for it (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); set [deploy] build_dir to a directory "
                "it can reach (e.g. /var/lib/git-gateway/builds), or "
                f"`chmod o+x {directory}`"
            )
        directory.chmod(stat.S_IMODE(info.st_mode) | needed)
        changed.append(directory)
    return changed


def give(path: Path, run_as: RunAs | None) -> None:
    """Give an export directory to the sandbox user (blocking; run off the loop)."""
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid, follow_symlinks=False)
    path.chmod(0o700)


def check_owned(build_dir: Path) -> None:
    """The build directory and every directory above it must be safe from other local users:
    the build directory a real directory of the gateway's own that only it can write, and no
    directory above it writable by others unless sticky (as /tmp and /var/tmp are), so that
    nobody can swap a deploy's export for a link between its creation and its use."""
    info = os.lstat(build_dir)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise SandboxError(
            f"deploy sandbox: [deploy] build_dir ({build_dir}) must be a directory (not a "
            "link) of the gateway's own user that no one else can write; found "
            f"{_describe(info)}: remove it, or set [deploy] build_dir to another directory"
        )
    for directory in build_dir.resolve().parents:
        info = directory.stat()
        shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX
        if shared or info.st_uid not in (0, os.geteuid()):
            raise SandboxError(
                f"deploy sandbox: [deploy] build_dir ({build_dir}) lies in {directory}, which "
                f"another user can change ({_describe(info)}): set [deploy] build_dir to a "
                "directory under ones only root or the gateway's user can write"
            )


def _describe(info: os.stat_result) -> str:
    kind = "a link" if stat.S_ISLNK(info.st_mode) else "a directory"
    if not stat.S_ISDIR(info.st_mode) and not stat.S_ISLNK(info.st_mode):
        kind = "a file"
    return f"{kind}, owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"


def _search_bit(info: os.stat_result, user: RunAs) -> int:
    """The permission bit that lets `user` (no supplementary groups) search a directory with
    this owner and group."""
    if info.st_uid == user.uid:
        return stat.S_IXUSR
    if info.st_gid == user.gid:
        return stat.S_IXGRP
    return stat.S_IXOTH


def _is_home(directory: Path) -> bool:
    """A user's home directory: private on purpose, never opened up by the gateway."""
    if directory == Path("/root"):
        return True
    try:
        return any(Path(entry.pw_dir) == directory for entry in pwd.getpwall())
    except OSError:
        return True  # cannot tell: leave it alone


def remove_tree(path: Path) -> None:
    """Remove a deploy's directory (blocking), whatever its content: any depth, permissions
    a build took away (read-only or 000 directories), never following a link out of it.

    The tree is hostile: pushed directories nest as deep as tar unpacks (~2000 levels), a
    build's as deep as it likes. shutil.rmtree recursed once per level and held a descriptor
    per level: past Python's recursion limit it raised, and the export (up to
    max_export_size, from a small compressed push) stayed on disk for good. coreutils' rm
    walks any depth with a bounded number of descriptors, and does not follow links."""
    if path.is_symlink():
        path.unlink()
        return
    if _rm(path):
        return
    # Not root: a directory the build made unreadable or read-only (the files are the
    # gateway user's own, through the sandbox's user namespace) is opened up, then removed.
    _coreutil(["chmod", "-R", "u+rwx", "--", str(path)])
    if not _rm(path):
        log.warning("event=export_not_removed path=%s", q(str(path)))


def _rm(path: Path) -> bool:
    """rm -rf, staying on the export's filesystem; whether the path is gone."""
    _coreutil(["rm", "-rf", "--one-file-system", "--", str(path)])
    return not os.path.lexists(path)


def _coreutil(argv: list[str]) -> None:
    # No timeout: the directory must go, however large (this runs on a worker thread).
    subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
