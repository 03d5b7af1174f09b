"""One deploy's output: written by its runner to the registry in batches, bounded to its tail,
and read back by any gateway process (watchers follow it there)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from ..logs import q
from ..models import LogChunk
from ..store import Store, storable

log = logging.getLogger("gateway.deploys")

# One chunk of output, of at most CHUNK_BYTES, goes to the registry per FLUSH_INTERVAL
# (watchers see it that late): a deploy that prints faster has the excess beyond its log
# limit cut (with a marker) rather than make the shared registry write more.
FLUSH_INTERVAL = 0.1
CHUNK_BYTES = 64 * 1024
RETRY_DELAY = 1.0  # seconds before writing again after the registry failed


def cut_marker(dropped: int) -> str:
    return f"[... {dropped} bytes of earlier output cut: the log keeps the last part ...]\n"


def skip_marker(skipped: int) -> str:
    return f"\n[... {skipped} bytes skipped: this watcher fell behind the deploy ...]\n"


def gap_marker(skipped: int) -> str:
    return f"\n[... {skipped} bytes of output cut: it came faster than it could be stored ...]\n"


def render(chunks: Iterable[LogChunk], start: int = 0, *, closing: bool = True) -> str:
    """The text of these chunks (in order) for a reader who had everything before `start`:
    a marker where output is missing, at the start (trimmed) or between chunks."""
    parts: list[str] = []
    at = start
    for chunk in chunks:
        if chunk.position > at:
            missing = chunk.position - at
            parts.append(cut_marker(missing) if at == 0 and not parts else gap_marker(missing))
        if chunk.closing and not closing:
            at = chunk.end
            continue
        parts.append(chunk.text)
        at = chunk.end
    return "".join(parts)


async def read_log(store: Store, deploy_id: int) -> str:
    """Everything kept of a deploy's log, final line included."""
    chunks: list[LogChunk] = []
    after = 0
    while True:
        page = await store.deploy_log(deploy_id, after)
        if not page:
            break
        chunks.extend(page)
        after = page[-1].seq
    return render(chunks)


class DeployLog:
    """The runner's side: `write` never blocks nor fails (deploy output keeps flowing while
    the registry is slow or away); at most `limit` bytes wait, the oldest give way."""

    def __init__(self, store: Store, deploy_id: int, limit: int) -> None:
        self.store = store
        self.deploy_id = deploy_id
        self.limit = limit
        self._pending: deque[str] = deque()
        self._pending_bytes = 0
        self._skipped = 0  # bytes dropped from the pending output, never stored
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._ready = asyncio.Event()
        self._closing = False
        self._last = -FLUSH_INTERVAL  # when a batch was last stored: one per interval
        self.closed = False
        self._writer = asyncio.create_task(self._write_batches())

    # -- writing --

    def write_bytes(self, data: bytes) -> None:
        self.write(self._decoder.decode(data))

    def write(self, text: str) -> None:
        if not text or self._closing:
            return
        text = storable(text)  # counted as it will be stored
        encoded = text.encode()
        if len(encoded) > self.limit:  # only its tail can be kept
            cut = len(encoded) - self.limit
            self._skipped += cut
            encoded = encoded[cut:]
            text = encoded.decode("utf-8", "ignore")
        self._pending.append(text)
        self._pending_bytes += len(text.encode("utf-8", "replace"))
        while self._pending_bytes > self.limit and len(self._pending) > 1:
            dropped = len(self._pending.popleft().encode("utf-8", "replace"))
            self._pending_bytes -= dropped
            self._skipped += dropped
        self._ready.set()

    def _batch(self) -> tuple[str, int]:
        """Take what waits, up to a chunk (a longer piece is split on characters)."""
        parts: list[str] = []
        size = 0
        # Small chunks against the limit: the registry trims whole chunks, so the kept log
        # stays within a few percent of the limit.
        most = min(CHUNK_BYTES, max(1024, self.limit // 16))
        while self._pending and size < most:
            piece = self._pending.popleft()
            encoded = piece.encode("utf-8", "replace")
            if size + len(encoded) > most:
                room = most - size
                head = encoded[:room].decode("utf-8", "ignore")
                rest = piece[len(head) :]
                if head:
                    parts.append(head)
                    size += len(head.encode("utf-8", "replace"))
                self._pending.appendleft(rest)
                break
            parts.append(piece)
            size += len(encoded)
        self._pending_bytes -= size
        skipped, self._skipped = self._skipped, 0
        return "".join(parts), skipped

    async def _write_batches(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                pause = self._last + FLUSH_INTERVAL - time.monotonic()
                if pause > 0 and not self._closing:
                    await asyncio.sleep(pause)  # what comes meanwhile joins the batch
                text, skipped = self._batch()
                try:
                    await self.store.append_deploy_log(
                        self.deploy_id, text, skipped=skipped, keep=self.limit
                    )
                except Exception as exc:
                    # Whatever failed (an outage, a lock, a bug), the output is put back (the
                    # bound still holds) and written again soon: the writer never dies.
                    self._pending.appendleft(text)
                    self._pending_bytes += len(text.encode("utf-8", "replace"))
                    self._skipped += skipped
                    log.warning(
                        "event=deploy_log_delayed deploy=%d reason=%s", self.deploy_id, q(exc)
                    )
                    if self._closing:
                        return
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                self._last = time.monotonic()
            if self._closing:
                return

    async def close(self, final_line: str = "") -> None:
        """Store what waits, then the final line (kept in the log; each watcher prints its
        own closing line from the final record). Watchers see the end from the record."""
        if self.closed:
            return
        self.write(self._decoder.decode(b"", final=True))
        self._closing = True
        self._ready.set()
        with contextlib.suppress(Exception):
            await self._writer
        self.closed = True
        if final_line:
            with contextlib.suppress(Exception):
                await self.store.append_deploy_log(
                    self.deploy_id, final_line, closing=True, keep=self.limit
                )

    def abandon(self) -> None:
        """Stop writing (the gateway is stopping and will not wait)."""
        self._closing = self.closed = True
        self._writer.cancel()


# -- logs written to files by earlier versions --


def legacy_log_ids(log_dir: Path) -> list[int]:
    """Deploy ids with a log file in `log_dir`, as earlier versions wrote them."""
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-4]) for n in names if n.endswith(".log") and n[:-4].isdigit())


def read_legacy_log(log_dir: Path, deploy_id: int, limit: int) -> str | None:
    """The tail of an earlier version's log file; None unless it is a regular file (a
    symlink in its place would show someone else's file)."""
    try:
        fd = os.open(
            log_dir / f"{deploy_id}.log",
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    with open(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_size > limit:
            file.seek(info.st_size - limit)
        return file.read(limit).decode("utf-8", "replace")
