"""What an app repository may hold: the gateway's config, git's own data, nothing else.

A bare repository is a directory of files that git obeys: an executable in `hooks/` runs on
the next push, a config key can name a program (`core.fsmonitor`, `tar.<format>.command`,
`filter.<driver>.smudge`, `core.alternateRefsCommand`...) or another file to read
(`include.path`), `objects/info/alternates` and `commondir` make git read and write another
repository, a symlinked `refs/heads` writes another app's branches. Whatever wrote into a
repository (a compromised deploy, a stray operator), `enforce` puts it back: `hooks/` holds
exactly the gateway's hooks (none, when git takes them from the gateway's own directory), the
config is exactly the gateway's (an allow-list of bytes, not a deny-list of keys), and every
other entry at the levels git reads is in an allow-list or removed. It works on directory
descriptors opened with O_NOFOLLOW, so it never writes through a symlink or a hard link and
never follows one out of the repository.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

FILE, DIR = "file", "dir"

# The top level of a bare repository as git and the gateway use it (gitrepository-layout(5)).
# Left out on purpose, so they are removed: `commondir` (use another repository's refs and
# objects), `config.worktree` (more config), `shallow` (hides history), `worktrees/`,
# `modules/`, `index`, `FETCH_HEAD`... none of which a push or a clone writes here.
TOP_LEVEL: Mapping[str, str] = {
    "HEAD": FILE,
    "config": FILE,
    "description": FILE,
    "packed-refs": FILE,
    "gc.pid": FILE,  # git gc --auto, run by receive-pack after a push
    "gc.log": FILE,
    "branches": DIR,
    "hooks": DIR,
    "info": DIR,
    "logs": DIR,
    "objects": DIR,
    "refs": DIR,
}
# `info/attributes` is the gateway's own (see Layout.attributes); `info/grafts` (history
# rewrite) is not in it.
INFO: Mapping[str, str] = {"exclude": FILE, "refs": FILE, "attributes": FILE}
# `alternates` and `http-alternates` (read objects of another repository) are not in it.
OBJECTS_INFO: Mapping[str, str] = {"packs": FILE, "commit-graph": FILE, "commit-graphs": DIR}
# Trees of git's own data (loose refs, reflogs): any name, but never a symlink.
SYMLINK_FREE_TREES = ("refs", "logs")

# Our own staging files while a file is replaced; a concurrent enforce must not take them
# for planted files (git never runs or reads them), but leftovers of a crash are removed.
TEMP_PREFIX = ".gateway-new-"
TEMP_GRACE = 60.0

HOOK_MODE = 0o755  # exactly: git runs hooks that are executable

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _never(name: str, content: bytes) -> bool:
    return False


# Is this content what an earlier version or configuration of the gateway wrote under this
# name ("config", or a hook name)? Replacing or removing it is then an update, not a removal
# of something planted.
Generated = Callable[[str, bytes], bool]


@dataclass(frozen=True)
class Layout:
    """The files the gateway owns in every repository."""

    hooks: Mapping[str, bytes]  # hook name -> script; none when git takes hooks elsewhere
    config: bytes
    # `info/attributes`: it takes precedence over the `.gitattributes` of the pushed tree.
    attributes: bytes = b""
    generated: Generated = _never


@dataclass(frozen=True)
class Change:
    path: str  # relative to the directory enforced
    # removed | rewritten (planted content replaced) | restored (was missing)
    # | updated (the gateway's own file from an earlier version or configuration)
    action: str


def enforce(repo: Path, layout: Layout) -> list[Change]:
    """Make `repo` hold exactly what `layout` says plus git's own data; return what changed.

    A missing repository is left alone (the caller reports it). Raises OSError if a change
    is needed and cannot be made: the caller must then not run git on the repository.
    """
    try:
        root = os.open(repo, _DIR_FLAGS)
    except FileNotFoundError:
        return []
    changes: list[Change] = []
    try:
        _allow_only(root, "", TOP_LEVEL, changes)
        with _closing(_ensure_dir(root, "hooks", changes, "hooks")) as hooks:
            changes += enforce_hooks_fd(hooks, layout.hooks, layout.generated, "hooks/")
        if not _matches(root, "config", layout.config, None):
            action = _replacement(root, "config", layout.generated, None)
            _write(root, "config", layout.config, None)
            changes.append(Change("config", action))
        with _closing(_ensure_dir(root, "info", changes, "info")) as info:
            _allow_only(info, "info/", INFO, changes)
            if info is not None and not _matches(info, "attributes", layout.attributes, None):
                # Missing: a repository from before the file existed; the gateway's own.
                action = (
                    "updated"
                    if not _exists(info, "attributes")
                    else _replacement(info, "attributes", layout.generated, None)
                )
                _write(info, "attributes", layout.attributes, None)
                changes.append(Change("info/attributes", action))
        with _closing(_open_dir(root, "objects", changes, "objects")) as objects:
            if objects is not None:
                _no_symlinks(objects, "objects/", changes, recurse=False)
                with _closing(_open_dir(objects, "info", changes, "objects/info")) as info:
                    if info is not None:
                        _allow_only(info, "objects/info/", OBJECTS_INFO, changes)
                with _closing(_open_dir(objects, "pack", changes, "objects/pack")) as pack:
                    if pack is not None:
                        _no_symlinks(pack, "objects/pack/", changes, recurse=False)
        for tree in SYMLINK_FREE_TREES:
            with _closing(_open_dir(root, tree, changes, tree)) as sub:
                if sub is not None:
                    _no_symlinks(sub, f"{tree}/", changes, recurse=True)
    finally:
        os.close(root)
    return changes


def enforce_hooks(
    directory: Path, hooks: Mapping[str, bytes], generated: Generated = _never
) -> list[Change]:
    """Make `directory` (created if missing, never through a symlink) hold exactly `hooks`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    changes: list[Change] = []
    with (
        _closing(os.open(directory.parent, _DIR_FLAGS)) as parent,
        _closing(_ensure_dir(parent, directory.name, changes, directory.name)) as fd,
    ):
        changes += enforce_hooks_fd(fd, hooks, generated, f"{directory.name}/")
    return changes


def enforce_hooks_fd(
    fd: int, hooks: Mapping[str, bytes], generated: Generated, prefix: str
) -> list[Change]:
    changes: list[Change] = []
    for entry in _entries(fd):
        if (entry.name in hooks and _kind(entry) == FILE) or _own_temp(entry, fd):
            continue
        ours = _kind(entry) == FILE and _is_generated(fd, entry.name, generated, HOOK_MODE)
        _remove(fd, entry)
        changes.append(Change(prefix + entry.name, "updated" if ours else "removed"))
    for name, script in hooks.items():
        if not _matches(fd, name, script, HOOK_MODE):
            action = _replacement(fd, name, generated, HOOK_MODE)
            _write(fd, name, script, HOOK_MODE)
            changes.append(Change(prefix + name, action))
    return changes


def _replacement(fd: int, name: str, generated: Generated, mode: int | None) -> str:
    """How to call the replacement of `name`, judged from what is there now."""
    if not _exists(fd, name):
        return "restored"
    return "updated" if _is_generated(fd, name, generated, mode) else "rewritten"


def _is_generated(fd: int, name: str, generated: Generated, mode: int | None) -> bool:
    previous = _read_regular(fd, name, 256 * 1024, mode)
    return previous is not None and generated(name, previous)


# -- helpers on directory descriptors --


# A descriptor that may be missing stays "maybe" inside the block; one that is sure, sure.
_Fd = TypeVar("_Fd", int, int | None)


@contextlib.contextmanager
def _closing(fd: _Fd) -> Iterator[_Fd]:
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _entries(fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return list(it)


def _kind(entry: os.DirEntry[str]) -> str | None:
    """FILE or DIR for a regular file or a real directory; None for a symlink, FIFO..."""
    if entry.is_symlink():
        return None
    if entry.is_dir(follow_symlinks=False):
        return DIR
    if entry.is_file(follow_symlinks=False):
        return FILE
    return None


def _own_temp(entry: os.DirEntry[str], fd: int) -> bool:
    if not entry.name.startswith(TEMP_PREFIX) or _kind(entry) != FILE:
        return False
    try:
        age = time.time() - os.stat(entry.name, dir_fd=fd, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return True  # already renamed into place by its writer
    return age < TEMP_GRACE


def _allow_only(fd: int, prefix: str, allowed: Mapping[str, str], changes: list[Change]) -> None:
    """Remove every entry of the directory that is not allowed with its kind. git's lock
    files (`*.lock`, held during an update) are left alone."""
    for entry in _entries(fd):
        kind = _kind(entry)
        if allowed.get(entry.name) == kind and kind is not None:
            continue
        if kind == FILE and (entry.name.endswith(".lock") or _own_temp(entry, fd)):
            continue
        _remove(fd, entry)
        changes.append(Change(prefix + entry.name, "removed"))


def _no_symlinks(fd: int, prefix: str, changes: list[Change], *, recurse: bool) -> None:
    for entry in _entries(fd):
        if entry.is_symlink():
            _remove(fd, entry)
            changes.append(Change(prefix + entry.name, "removed"))
        elif recurse and entry.is_dir(follow_symlinks=False):
            try:
                sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue  # removed meanwhile (git deletes emptied ref directories)
            try:
                _no_symlinks(sub, f"{prefix}{entry.name}/", changes, recurse=True)
            finally:
                os.close(sub)


def _open_dir(fd: int, name: str, changes: list[Change], shown: str) -> int | None:
    """Open a real subdirectory; a symlink or a file in its place is removed (None then,
    as when it does not exist)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    # ELOOP: a symlink (O_NOFOLLOW); ENOTDIR: a file. Either way, not ours.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=fd)
    changes.append(Change(shown, "removed"))
    return None


def _ensure_dir(fd: int, name: str, changes: list[Change], shown: str) -> int:
    found = _open_dir(fd, name, changes, shown)
    if found is not None:
        return found
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=fd)
    return os.open(name, _DIR_FLAGS, dir_fd=fd)


def _remove(fd: int, entry: os.DirEntry[str]) -> None:
    try:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.name, dir_fd=fd)
        else:
            os.unlink(entry.name, dir_fd=fd)
    except FileNotFoundError:
        pass  # removed meanwhile


def _exists(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _matches(fd: int, name: str, data: bytes, mode: int | None) -> bool:
    """Is `name` a regular file with exactly this content (and mode, unless None), linked
    nowhere else? (A second hard link would let its other path change our file in place.)"""
    return _read_regular(fd, name, len(data), mode) == data


def _read_regular(fd: int, name: str, limit: int, mode: int | None = None) -> bytes | None:
    """The content of `name` if it is a regular file of at most `limit` bytes with one link
    (and this mode, unless None); else None. Never follows a symlink."""
    try:
        # O_NONBLOCK: a FIFO planted under this name must not hang the check.
        file = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return None  # missing, or a symlink (ELOOP)
    try:
        info = os.fstat(file)
        if (
            not stat.S_ISREG(info.st_mode)
            or (mode is not None and stat.S_IMODE(info.st_mode) != mode)
            or info.st_nlink != 1
            or info.st_size > limit
        ):
            return None
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(file, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks) if size <= limit else None
    finally:
        os.close(file)


def _write(fd: int, name: str, data: bytes, mode: int | None) -> None:
    """Replace `name` atomically with a new file (a new inode: whatever was there, symlink
    or hard link included, is replaced, never written through). Mode None: as the umask
    says, like the rest of the repository."""
    temp = f"{TEMP_PREFIX}{name}-{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    file = os.open(temp, flags, 0o666 if mode is None else mode, dir_fd=fd)
    try:
        try:
            if mode is not None:
                os.fchmod(file, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(file, view) :]
            os.fsync(file)
        finally:
            os.close(file)
        os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=fd)
        raise
