"""The deploy log: bounded tail in memory and on disk, live fan-out to subscribers."""

from __future__ import annotations

import asyncio

import pytest

from gateway.deploylog import (
    WATCHER_BUFFER,
    DeployLog,
    LogExists,
    highest_log_id,
    move_logs,
    read_log,
)


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


# -- a log file is created exclusively, never appended to, never followed --


def test_regression_an_existing_log_is_never_appended_to(tmp_path):
    planted = tmp_path / "7.log"
    planted.write_text("DATABASE_URL=postgres://old-owner:s3cr3t@db\n")
    with pytest.raises(LogExists) as refused:
        DeployLog(tmp_path, 7, limit=1000)
    assert "deploy #7" in str(refused.value) and str(tmp_path) not in str(refused.value)
    moved = refused.value.moved_to
    assert (
        moved is not None and moved.read_text() == "DATABASE_URL=postgres://old-owner:s3cr3t@db\n"
    )
    assert not moved.name.endswith(".log")
    assert read_log(tmp_path, 7) == ""  # never shown as deploy 7's log
    log = DeployLog(tmp_path, 7, limit=1000)  # now the place is free
    log.close("mine\n")
    assert read_log(tmp_path, 7) == "mine\n"


def test_regression_a_planted_symlink_is_not_written_through_nor_read(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "8.log").symlink_to(victim)
    assert read_log(logs, 8) == ""
    (logs / "9.log").mkdir()
    assert read_log(logs, 9) == ""
    with pytest.raises(LogExists):
        DeployLog(logs, 8, limit=1000)
    assert victim.read_text() == "someone else's file\n"


def test_log_file_mode_and_rewrite_stay_private(tmp_path):
    log = DeployLog(tmp_path, 9, limit=100)
    for i in range(100):
        log.write(f"line {i}\n")  # forces rewrites
    log.close()
    assert (tmp_path / "9.log").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["9.log"]  # no staging left behind


def test_resume_takes_only_its_own_empty_file(tmp_path):
    (tmp_path / "3.log").write_text("")  # created by the previous run, deploy never started
    DeployLog(tmp_path, 3, limit=100, resume=True).close("resumed\n")
    assert read_log(tmp_path, 3) == "resumed\n"
    (tmp_path / "4.log").write_text("not empty\n")
    with pytest.raises(LogExists):
        DeployLog(tmp_path, 4, limit=100, resume=True)


def test_highest_log_id_and_move_logs(tmp_path):
    logs = tmp_path / "logs"
    assert highest_log_id(logs) == 0
    logs.mkdir()
    for name in ("3.log", "12.log", "x.log", "40.log.refused-1", ".5.log.ab.new"):
        (logs / name).write_text(name)
    assert highest_log_id(logs) == 12
    target = tmp_path / "trash" / "web.deploys"
    target.parent.mkdir()
    assert move_logs(logs, [1, 2], target) == 0 and not target.exists()
    assert move_logs(logs, [3, 12, 99], target) == 2
    assert sorted(p.name for p in target.iterdir()) == ["12.log", "3.log"]
    assert target.stat().st_mode & 0o777 == 0o700
