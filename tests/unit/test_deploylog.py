"""The deploy log: written in batches to the registry, bounded to its tail, read back whole."""

from __future__ import annotations

import os

import pytest

from gateway.domain.deploylog import DeployLog, legacy_log_ids, read_legacy_log, read_log, render
from gateway.models import LogChunk, NewDeploy
from gateway.store import open_store


@pytest.fixture
async def store(tmp_path):
    opened = await open_store(tmp_path / "gw.db")
    await opened.create_user("alice")
    await opened.create_app("web", "alice", "main")
    yield opened
    await opened.close()


async def new_deploy(store) -> int:
    app = await store.get_app("web")
    new = NewDeploy(
        app.id, "refs/heads/main", "0" * 40, "1" * 40, "alice", "SHA256:x", "s", "a", "attached",
        "command",
    )  # fmt: skip
    record = await store.create_deploy(new)
    return record.id


async def test_output_is_stored_with_the_final_line(store):
    deploy_id = await new_deploy(store)
    log = DeployLog(store, deploy_id, limit=1000)
    log.write("one\n")
    log.write_bytes(b"two\n")
    await log.close("----> done\n")
    assert await read_log(store, deploy_id) == "one\ntwo\n----> done\n"
    chunks = await store.deploy_log(deploy_id)
    assert chunks[-1].closing and not any(c.closing for c in chunks[:-1])
    log.write("after the end\n")  # ignored
    assert await read_log(store, deploy_id) == "one\ntwo\n----> done\n"


async def test_multibyte_text_split_across_writes(store):
    deploy_id = await new_deploy(store)
    log = DeployLog(store, deploy_id, limit=1000)
    data = "héllo wörld ✓\n".encode()
    for i in range(len(data)):
        log.write_bytes(data[i : i + 1])
    await log.close()
    assert await read_log(store, deploy_id) == "héllo wörld ✓\n"


async def test_a_flood_keeps_the_tail_and_says_what_was_cut(store):
    deploy_id = await new_deploy(store)
    log = DeployLog(store, deploy_id, limit=10_000)
    for i in range(20_000):  # 340 KB, faster than any batch interval
        log.write(f"output line {i:05d}\n")
    await log.close("----> end\n")
    text = await read_log(store, deploy_id)
    assert text.startswith("[... ") and "bytes of earlier output cut" in text
    assert text.endswith("output line 19999\n----> end\n")
    assert len(text.encode()) < 3 * 10_000  # the kept tail, not the flood
    stored = sum(c.size for c in await store.deploy_log(deploy_id))
    assert stored <= 2 * 10_000


def test_render_marks_what_is_missing():
    chunks = [LogChunk(3, 100, 4, False, "abc\n"), LogChunk(4, 110, 4, False, "def\n")]
    text = render(chunks)
    assert text.startswith("[... 100 bytes of earlier output cut")
    assert "abc\n\n[... 6 bytes of output cut" in text and text.endswith("def\n")
    assert render(chunks, start=104).startswith("abc\n")
    closing = [*chunks, LogChunk(5, 114, 5, True, "end.\n")]
    assert render(closing).endswith("end.\n") and not render(closing, closing=False).endswith(
        "end.\n"
    )


def test_legacy_log_files_are_read_only_if_regular(tmp_path):
    (tmp_path / "3.log").write_text("x" * 50 + "tail\n")
    (tmp_path / "7.log").symlink_to("/etc/passwd")
    (tmp_path / "notes.txt").write_text("not a log\n")
    os.mkfifo(tmp_path / "9.log")
    assert legacy_log_ids(tmp_path) == [3, 7, 9]
    assert read_legacy_log(tmp_path, 3, 10) == "xxxxxtail\n"  # the tail only
    assert read_legacy_log(tmp_path, 7, 100) is None  # a symlink is never followed
    assert read_legacy_log(tmp_path, 9, 100) is None  # nor a fifo read
    assert read_legacy_log(tmp_path, 4, 100) is None
    assert legacy_log_ids(tmp_path / "missing") == []
