"""The gateway's side of the pack-objects cache: its directory, upload-pack's settings, metrics.

The work itself happens in the hook (gateway/git/packhook.py), inside each upload-pack, so that
pack bytes never cross the gateway's event loop; this module prepares the node's private
directory, tells upload-pack to run the hook, and turns each hook's one-datagram report into
metrics and log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

from ..config import GitSettings
from ..logs import q
from ..metrics import Metrics
from . import packhook

log = logging.getLogger("gateway.packcache")

# git runs the hook value through its shell logic unless it is a plain word: the hook path
# must hold nothing a shell would read, so that git execs it directly.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._+-]*")
MAX_SOCKET_PATH = 107
RESULTS = ("hit", "shared", "miss", "bypass")
PROBLEMS = (
    "pack_cache_bad_entry",
    "pack_cache_write_failed",
    "pack_cache_unusable",
    "pack_cache_leader_failed",
    "pack_cache_join_timeout",
)


def prepare(directory: Path) -> None:
    """Create the cache directory, or check an existing one: a real directory (not a
    symlink) of this user, made 0700, with its parts. Raises OSError or ValueError."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise ValueError(f"{directory} belongs to uid {info.st_uid}, not to the gateway's user")
    os.chmod(directory, 0o700, follow_symlinks=False)
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in packhook.SUBDIRS:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=root)
            part = os.stat(name, dir_fd=root, follow_symlinks=False)
            if not stat.S_ISDIR(part.st_mode) or part.st_uid != os.geteuid():
                raise ValueError(f"{directory}/{name} is not a directory of the gateway's user")
            os.chmod(name, 0o700, dir_fd=root, follow_symlinks=False)
        fd = os.open(packhook.LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=root)
        os.close(fd)
    finally:
        os.close(root)


class PackCache:
    """Whether upload-pack runs the hook, and the settings it runs with."""

    def __init__(self, settings: GitSettings, git: str, hook: Path, stats: Path) -> None:
        if settings.pack_cache_dir is None:  # pragma: no cover - config.from_mapping sets it
            raise ValueError("[git] pack_cache_dir is not resolved")
        self.directory = settings.pack_cache_dir
        self.max_size = settings.pack_cache_max_size
        self.max_age = settings.pack_cache_max_age
        self.max_markers = settings.pack_cache_max_markers
        self.git = git
        self.hook = hook
        self.stats = stats
        self.enabled = False
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self, metrics: Metrics | None) -> None:
        """Prepare the directory and listen for the hooks' reports; any failure leaves the
        cache off (fetches run git as without it) and says why in the log."""
        if not _PLAIN_PATH.fullmatch(str(self.hook)):
            log.error("event=pack_cache_off reason=%s", q(f"hook path not plain: {self.hook}"))
            return
        try:
            await asyncio.to_thread(prepare, self.directory)
        except (OSError, ValueError) as exc:
            log.error("event=pack_cache_off dir=%s reason=%s", q(self.directory), q(exc))
            return
        self.enabled = True
        if len(os.fsencode(self.stats)) > MAX_SOCKET_PATH:
            log.warning("event=pack_cache_no_metrics reason=socket_path_too_long")
            return
        with contextlib.suppress(FileNotFoundError):
            self.stats.unlink()
        loop = asyncio.get_running_loop()
        old_umask = os.umask(0o177)  # service user only, like the control socket
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Reports(metrics), local_addr=str(self.stats), family=socket.AF_UNIX
            )
        except OSError as exc:
            log.warning("event=pack_cache_no_metrics reason=%s", q(exc))
        finally:
            os.umask(old_umask)
        log.info("event=pack_cache_on dir=%s", q(self.directory))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            with contextlib.suppress(FileNotFoundError):
                self.stats.unlink()

    def upload_pack_config(self) -> list[tuple[str, str]]:
        """Extra `-c` settings of upload-pack (protected configuration: git takes this key
        from the command line, never from the repository)."""
        return [("uploadpack.packObjectsHook", str(self.hook))] if self.enabled else []

    def environment(self) -> dict[str, str]:
        if not self.enabled:
            return {}
        env = {
            packhook.DIR_ENV: str(self.directory),
            packhook.MAX_SIZE_ENV: str(self.max_size),
            packhook.MAX_AGE_ENV: str(self.max_age),
            packhook.MAX_MARKERS_ENV: str(self.max_markers),
            packhook.GIT_ENV: self.git,
        }
        if self._transport is not None:
            env[packhook.STATS_ENV] = str(self.stats)
        return env


class _Reports(asyncio.DatagramProtocol):
    """One datagram per hook run: counts for the metrics, problems for the log."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            report = json.loads(data)
            result = report["result"]
            served, written = int(report.get("served", 0)), int(report.get("written", 0))
            problems = report.get("problems", [])
            if result not in RESULTS or served < 0 or written < 0 or not isinstance(problems, list):
                raise ValueError("bad report")
        except (ValueError, KeyError, TypeError):
            log.warning("event=pack_cache_bad_report size=%d", len(data))
            return
        key = str(report.get("key", ""))[:64]
        for problem in problems[:8]:
            if not isinstance(problem, dict) or problem.get("event") not in PROBLEMS:
                continue
            log.warning(
                "event=%s key=%s reason=%s",
                problem["event"],
                q(str(problem.get("key") or key)[:64]),
                q(str(problem.get("reason", ""))[:300]),
            )
        if self.metrics is not None:
            self.metrics.pack_cache_done(result, served, written)
