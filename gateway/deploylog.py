"""One deploy's output: live to every watcher, kept on disk, bounded to its tail."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from .errors import GatewayError

# What one watcher (an attached push, `logs --follow`) may have waiting for it: a watcher
# that stops reading skips ahead with a marker instead of holding the deploy's output.
WATCHER_BUFFER = 1024 * 1024

# Every open of a log file: never through a symlink, readable by the service user only.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MODE = 0o600


class LogExists(GatewayError):
    """A file already sits where a new deploy's log goes. It is never appended to, nor shown
    as this deploy's log: it was moved aside (to `moved_to`, for the operator) and the deploy
    must fail with this message."""

    def __init__(self, deploy_id: int, path: Path, moved_to: Path | None) -> None:
        super().__init__(
            f"a log file for deploy #{deploy_id} already existed on the server: it was set "
            "aside, never reused; the operator can see why"
        )
        self.deploy_id = deploy_id
        self.path = path
        self.moved_to = moved_to


def log_path(log_dir: Path, deploy_id: int) -> Path:
    return log_dir / f"{deploy_id}.log"


def cut_marker(dropped: int) -> str:
    return f"[... {dropped} bytes of earlier output cut: the log keeps the last part ...]\n"


def skip_marker(skipped: int) -> str:
    return f"\n[... {skipped} bytes skipped: this watcher fell behind the deploy ...]\n"


class _Skipped(int):
    """Bytes dropped for a watcher at this point of its stream."""


class Subscription:
    """One watcher's view of a log: the text so far, then what follows, bounded."""

    def __init__(self, so_far: str, limit: int = WATCHER_BUFFER) -> None:
        initial = len(so_far.encode("utf-8", "replace"))
        # The text so far is the log's kept tail (bounded by log_limit): on top of the buffer.
        self.limit = limit + initial
        self._items: deque[str | _Skipped] = deque([so_far] if so_far else [])
        self._bytes = initial
        self._ended = False
        self._ready = asyncio.Event()
        self._ready.set()

    def push(self, text: str) -> None:
        size = len(text.encode("utf-8", "replace"))
        if self._bytes + size > self.limit:
            last = self._items[-1] if self._items else None
            if isinstance(last, _Skipped):
                self._items[-1] = _Skipped(last + size)
            else:
                self._items.append(_Skipped(size))
        else:
            self._items.append(text)
            self._bytes += size
        self._ready.set()

    def end(self) -> None:
        self._ended = True
        self._ready.set()

    async def next(self) -> str | None:
        """The next text for this watcher; None once the log has ended."""
        while True:
            if self._items:
                item = self._items.popleft()
                if isinstance(item, _Skipped):
                    return skip_marker(int(item))
                self._bytes = max(0, self._bytes - len(item.encode("utf-8", "replace")))
                return item
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()


def read_log(log_dir: Path, deploy_id: int) -> str:
    """The stored log of a deploy (empty if none was written). Only a regular file is read:
    a symlink in its place would show someone else's file."""
    try:
        fd = os.open(
            log_path(log_dir, deploy_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink
            return ""
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return ""
    with open(fd, "rb") as file:
        return file.read().decode("utf-8", "replace")


def highest_log_id(log_dir: Path) -> int:
    """The highest deploy id with a log file in `log_dir` (0 if none)."""
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return 0
    ids = [int(n[:-4]) for n in names if n.endswith(".log") and n[:-4].isdigit()]
    return max(ids, default=0)


def move_logs(log_dir: Path, deploy_ids: list[int], target: Path) -> int:
    """Move these deploys' log files into the new directory `target` (created only if there
    is one to move); return how many moved. A deploy still writing keeps writing to its
    moved file when `target` is on the same filesystem."""
    moved = 0
    for deploy_id in deploy_ids:
        source = log_path(log_dir, deploy_id)
        if not os.path.lexists(source):
            continue
        if not moved:
            target.mkdir(mode=0o700)
        shutil.move(source, target / source.name)  # a symlink is moved, never followed
        moved += 1
    return moved


def _create(path: Path) -> int:
    return os.open(path, _CREATE, _MODE)


def _remove_if_empty(path: Path) -> None:
    """Remove the empty file the previous run created for a deploy that never started;
    anything else at that path is left for LogExists."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _set_aside(path: Path) -> Path | None:
    """Move whatever is at `path` (file, symlink, directory) to a name no deploy id reads."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.refused-{stamp}-{secrets.token_hex(3)}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


class DeployLog:
    """Appends text, keeps at most `limit` bytes of tail in memory and on disk, and fans the
    text out to subscribers (attached pushes, `logs --follow`)."""

    def __init__(self, log_dir: Path, deploy_id: int, limit: int, *, resume: bool = False) -> None:
        """Create the deploy's log file, exclusively: a file already there is never appended
        to (LogExists). `resume`: a queued deploy taken up again after a restart: the empty
        file the previous run created for it is replaced by a new one."""
        self.path = log_path(log_dir, deploy_id)
        self.limit = limit
        self._tail: deque[str] = deque()
        self._tail_bytes = 0
        self.dropped = 0
        self._subscribers: set[Subscription] = set()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.closed = False
        log_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _remove_if_empty(self.path)
        try:
            fd = _create(self.path)
        except FileExistsError:
            raise LogExists(deploy_id, self.path, _set_aside(self.path)) from None
        self._file = open(fd, "w", encoding="utf-8")  # noqa: SIM115 - lives with the log
        self._file_bytes = 0

    # -- writing --

    def write_bytes(self, data: bytes) -> None:
        self.write(self._decoder.decode(data))

    def write(self, text: str) -> None:
        if not text or self.closed:
            return
        size = len(text.encode("utf-8", "replace"))
        self._tail.append(text)
        self._tail_bytes += size
        self._trim()
        self._file.write(text)
        self._file.flush()
        self._file_bytes += size
        if self._file_bytes > 2 * self.limit:
            self._rewrite()  # keeps the file bounded while a chatty deploy runs
        for subscriber in self._subscribers:
            subscriber.push(text)

    def _trim(self) -> None:
        """Drop the oldest text beyond the limit; a partly dropped chunk is cut at its next
        line break so the kept tail starts with a whole line."""
        excess = self._tail_bytes - self.limit
        while excess > 0 and self._tail:
            oldest = self._tail[0].encode("utf-8", "replace")
            if len(oldest) <= excess:
                self._tail.popleft()
                cut = len(oldest)
            else:
                newline = oldest.find(b"\n", excess - 1)
                cut = len(oldest) if newline == -1 else newline + 1
                kept = oldest[cut:].decode("utf-8", "ignore")
                if kept:
                    self._tail[0] = kept
                else:
                    self._tail.popleft()
            self._tail_bytes -= cut
            self.dropped += cut
            excess -= cut

    def text(self) -> str:
        """Everything still kept: the cut marker, then the tail."""
        head = cut_marker(self.dropped) if self.dropped else ""
        return head + "".join(self._tail)

    def _rewrite(self) -> None:
        """Replace the file with the kept tail: a new file, created exclusively, renamed over
        the old one and written on from there (never reopened by name)."""
        staging = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.new")
        content = self.text()
        new = open(_create(staging), "w", encoding="utf-8")  # noqa: SIM115 - lives with the log
        try:
            new.write(content)
            new.flush()
            os.replace(staging, self.path)
        except BaseException:
            new.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise
        self._file.close()
        self._file = new
        self._file_bytes = len(content.encode("utf-8", "replace"))

    def close(self, final_line: str = "") -> None:
        """End the log. The final line is kept in the log but not sent to subscribers:
        each of them prints its own closing line from the final record."""
        if self.closed:
            return
        self.write(self._decoder.decode(b"", final=True))
        subscribers, self._subscribers = self._subscribers, set()
        if final_line:
            self.write(final_line)
        self._subscribers = subscribers
        self.closed = True
        if self.dropped:
            self._rewrite()
        self._file.close()
        for subscriber in self._subscribers:
            subscriber.end()

    # -- reading --

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A bounded subscription: the text kept so far, then what follows, then None."""
        subscription = Subscription(self.text())
        if self.closed:
            subscription.end()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
