"""Delivering a deploy's log to a watcher: one that stops reading is dropped, sooner once the
gateway drains, and never holds anything up."""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.deploys import watch


async def test_a_watcher_that_reads_gets_the_text() -> None:
    got: list[str] = []

    async def say(text: str) -> None:
        got.append(text)

    assert await watch.deliver(say, "line\n", asyncio.Event()) is True
    assert got == ["line\n"]


async def test_regression_a_watcher_that_stops_reading_is_dropped(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway.deploys")
    monkeypatch.setattr(watch, "WATCHER_STALL", 0.3)
    never = asyncio.Event()

    async def stalled(text: str) -> None:
        await never.wait()  # the client's window is full: the write never completes

    started = time.monotonic()
    assert await watch.deliver(stalled, "x" * 1000, asyncio.Event()) is False
    assert 0.3 <= time.monotonic() - started < 5
    assert "event=watcher_dropped reason=not_reading" in caplog.text


async def test_regression_a_stalled_watcher_is_dropped_quickly_once_draining(monkeypatch) -> None:
    monkeypatch.setattr(watch, "DRAIN_STALL", 0.2)
    draining = asyncio.Event()
    never = asyncio.Event()

    async def stalled(text: str) -> None:
        await never.wait()

    delivering = asyncio.ensure_future(watch.deliver(stalled, "x", draining))
    await asyncio.sleep(0.05)
    assert not delivering.done()  # within WATCHER_STALL (60 s): still waiting for it
    started = time.monotonic()
    draining.set()
    assert await asyncio.wait_for(delivering, 5) is False
    assert time.monotonic() - started < 2
