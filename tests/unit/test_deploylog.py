"""The deploy log: bounded tail in memory and on disk, live fan-out to subscribers."""

from __future__ import annotations

import asyncio

from gateway.deploylog import WATCHER_BUFFER, DeployLog, read_log


def test_tail_is_kept_at_line_boundaries(tmp_path):
    log = DeployLog(tmp_path, 1, limit=100)
    log.write_bytes(b"".join(b"line %03d\n" % i for i in range(50)))  # 450 bytes in one chunk
    text = log.text()
    assert text.startswith("[... ") and "bytes of earlier output cut" in text
    kept = text.split("\n", 1)[1]
    assert kept.startswith("line ") and kept.endswith("line 049\n")
    assert len(kept.encode()) <= 100
    log.close("----> done\n")
    stored = read_log(tmp_path, 1)
    assert stored.endswith("----> done\n") and "line 049" in stored and "line 000" not in stored


def test_file_stays_bounded_while_running(tmp_path):
    log = DeployLog(tmp_path, 2, limit=1000)
    for i in range(2000):
        log.write(f"output line {i:05d}\n")
    assert (tmp_path / "2.log").stat().st_size <= 3 * 1000
    log.close()
    assert (tmp_path / "2.log").stat().st_size <= 1200


def test_multibyte_text_split_across_chunks(tmp_path):
    log = DeployLog(tmp_path, 3, limit=1000)
    data = "héllo wörld ✓\n".encode()
    for i in range(len(data)):
        log.write_bytes(data[i : i + 1])
    log.close()
    assert read_log(tmp_path, 3) == "héllo wörld ✓\n"


async def test_subscribers_get_the_past_then_the_live_text(tmp_path):
    log = DeployLog(tmp_path, 4, limit=1000)
    log.write("before\n")
    with log.subscribe() as watcher:
        assert await asyncio.wait_for(watcher.next(), 5) == "before\n"
        log.write("after\n")
        log.close("final line (not sent to subscribers)\n")
        assert await asyncio.wait_for(watcher.next(), 5) == "after\n"
        assert await asyncio.wait_for(watcher.next(), 5) is None
    with log.subscribe() as watcher:  # a late subscriber of a closed log
        assert (await watcher.next() or "").endswith("final line (not sent to subscribers)\n")
        assert await watcher.next() is None


async def test_regression_stalled_watcher_is_bounded_and_skips_ahead(tmp_path):
    """A watcher that stops reading holds at most WATCHER_BUFFER of a chatty deploy's
    output; when it reads again it gets a marker for what it missed, then the live text."""
    log = DeployLog(tmp_path, 5, limit=64 * 1024)
    line = "x" * 99 + "\n"
    with log.subscribe() as watcher:
        for _ in range(100_000):  # 10 MB printed while the watcher does not read
            log.write(line)
        assert watcher._bytes <= WATCHER_BUFFER
        assert len(watcher._items) <= WATCHER_BUFFER // len(line) + 2
        received = []
        while "bytes skipped" not in (text := await asyncio.wait_for(watcher.next(), 5) or ""):
            received.append(text)  # it reads again: what was kept, then the marker
        assert sum(len(t) for t in received) <= WATCHER_BUFFER
        log.write("the end\n")  # and it is live again
        log.close()
        assert await asyncio.wait_for(watcher.next(), 5) == "the end\n"
        assert await asyncio.wait_for(watcher.next(), 5) is None
