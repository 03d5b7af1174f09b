"""Accepting connections when descriptors run out: pause with a growing delay, log rarely.

Out of file descriptors, `accept()` fails at once, again and again: retrying in a tight loop
burns a core and writes a log line per failure. Here the loop backs off (FIRST_PAUSE doubling
up to MAX_PAUSE), logs one line a minute with how many were held back, and one line when
accepting works again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

from ..logs import Throttle, q

FIRST_PAUSE = 0.05
MAX_PAUSE = 1.0
EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """One listening socket's accept loop step, shared by the SSH and HTTP listeners."""

    def __init__(self, logger: logging.Logger, event: str, name: str) -> None:
        self.log = logger
        self.event = event  # e.g. "accept" -> event=accept_failed / accept_resumed
        self.name = name
        self.throttle = Throttle()
        self._pause = FIRST_PAUSE
        self._failures = 0

    async def accept(self, listening: socket.socket) -> tuple[socket.socket, Any]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as exc:
                if exc.errno not in EXHAUSTED:
                    continue  # the client gave up before we took it: nothing to do
                self._failures += 1
                held = self.throttle.allow("accept")
                if held is not None:
                    self.log.error(
                        "event=%s_failed listener=%s reason=%s held_back=%d retry_in=%.2f",
                        self.event,
                        self.name,
                        q(exc.strerror or exc),
                        held,
                        self._pause,
                    )
                await asyncio.sleep(self._pause)
                self._pause = min(self._pause * 2, MAX_PAUSE)
                continue
            if self._failures:
                self.log.warning(
                    "event=%s_resumed listener=%s failures=%d",
                    self.event,
                    self.name,
                    self._failures,
                )
                self._failures, self._pause = 0, FIRST_PAUSE
            return sock, peer
