"""Check a deploy command's program in the exported tree before a sandbox is started for it.

A relative program (`./deploy`, `bin/deploy`) comes from the pushed tree: when it is missing
or not executable, the pusher should read that, not bwrap's `execvp: No such file`. The tree
is hostile, so the walk is done one component at a time with O_NOFOLLOW under the export's
directory descriptor: a symbolic link is followed only while it stays inside the export, and
one that leads out of it (`/etc/shadow`, `../../x`) is not judged here at all. The sandbox,
which sees only its own filesystem, then runs or refuses it; the gateway never looks outside.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import deque
from pathlib import Path

from .messages import short

MAX_LINKS = 40  # as the kernel's own limit on symbolic links in one lookup
# The walk holds a descriptor per directory level, in the gateway's own process: a hostile
# tree as deep as tar can unpack (~2000 levels) would take them all (EMFILE for every other
# connection meanwhile). A program deeper than this is not judged here: the sandbox runs it.
MAX_DEPTH = 64

MISSING = "missing"
NOT_EXECUTABLE = "not_executable"
NOT_A_FILE = "not_a_file"


def is_from_tree(program: str) -> bool:
    """A program taken from the export: relative, with a directory part (`./deploy`).
    Absolute programs and bare names (found by PATH inside the sandbox) are not."""
    return "/" in program and not program.startswith("/")


def problem(export: Path, program: str) -> str | None:
    """MISSING, NOT_EXECUTABLE or NOT_A_FILE for a program of the tree that cannot run;
    None when it can, when it is not from the tree, or when it cannot be judged from here."""
    if not is_from_tree(program):
        return None
    try:
        root = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        found = _lookup(root, program)
    finally:
        os.close(root)
    if found is None or isinstance(found, str):
        return found
    if not stat.S_ISREG(found.st_mode):
        return NOT_A_FILE
    return None if found.st_mode & 0o111 else NOT_EXECUTABLE


def _lookup(root: int, program: str) -> os.stat_result | str | None:
    """Walk `program` from `root`: its stat, MISSING, or None where it leaves the export
    (or cannot be read)."""
    dirs = [root]  # descriptors from the export down to the current directory
    pending = deque(program.split("/"))
    links = 0
    try:
        while pending:
            name = pending.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if len(dirs) == 1:
                    return None  # out of the export: the sandbox decides
                os.close(dirs.pop())
                continue
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dirs[-1])
            except (FileNotFoundError, NotADirectoryError):
                return MISSING
            except OSError:
                return None
            info = os.fstat(fd)
            if stat.S_ISLNK(info.st_mode):
                os.close(fd)
                links += 1
                target = os.readlink(name, dir_fd=dirs[-1])
                if links > MAX_LINKS or target.startswith("/"):
                    return None  # an absolute link points outside the export
                pending.extendleft(reversed(target.split("/")))
                continue
            if not pending:
                os.close(fd)
                return info
            if not stat.S_ISDIR(info.st_mode):
                os.close(fd)
                return MISSING
            dirs.append(fd)
            if len(dirs) > MAX_DEPTH:
                return None
        return None  # "./" or "dir/..": the export itself, no program named
    finally:
        for fd in dirs[1:]:
            with contextlib.suppress(OSError):
                os.close(fd)


def explain(program: str, kind: str, branch: str, sha: str, setting: str) -> str:
    """The one line the pusher reads for a program of the tree that cannot run."""
    where = f"in the pushed tree of branch '{branch}' ({short(sha)})"
    if kind == MISSING:
        return f"deploy command '{program}' not found {where}: add it, or change {setting}"
    path = os.path.normpath(program)
    if kind == NOT_EXECUTABLE:
        return (
            f"deploy command '{program}' is not executable {where}: "
            f"run `git update-index --chmod=+x {path}`, commit and push again"
        )
    return f"deploy command '{program}' is not a regular file {where}: fix it, or change {setting}"
