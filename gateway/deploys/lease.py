"""This process's lease in the registry's nodes table: renewed while it lives, fenced when
it lapses, and the others' lapsed leases declared gone (their running deploys interrupted)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from ..config import Config
from ..errors import StoreUnavailable
from ..models import Deploy
from ..store import Store
from .queue import QUEUE, Wakeups

log = logging.getLogger("gateway.deploys")


class Lease:
    """Renew this process's lease; fence this process (`stop_all`) when it cannot."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        node: str,
        node_name: str,
        wakeups: Wakeups,
        *,
        stop_all: Callable[[str], None],
        check_cancels: Callable[[], Awaitable[None]],
        interrupted: Callable[[Deploy], None],
        running: Callable[[], int],
    ) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.node_name = node_name
        self.wakeups = wakeups
        self._stop_all = stop_all  # stop every deploy running here, with this reason
        self._check_cancels = check_cancels
        self._interrupted = interrupted
        self._running = running
        self.fenced = False  # no renewal for half the timeout: running and claiming nothing
        self._healthy_since = time.monotonic()
        self._renewed = time.monotonic()  # the last successful lease renewal
        # Where the other nodes forward this node's repositories' operations, if they do.
        self.address: str | None = None

    async def join(self) -> None:
        """Register this process (at start, and after the others declared it gone)."""
        await self.store.register_node(self.node, self.node_name, os.getpid(), self.address)
        self._healthy_since = self._renewed = time.monotonic()

    async def loop(self) -> None:
        """Renew this process's lease; declare gone the processes whose lease lapsed, but only
        after this one has itself renewed without fail for a whole timeout (after an outage
        of the registry, every process gets its chance to renew first).

        A process that cannot renew for half the timeout fences itself: it stops what it
        runs (recorded as interrupted once the registry answers) and claims nothing, so that
        no deploy runs here while the others, who can no longer see this process, start the
        app's next one."""
        while True:
            timeout = self.config().cluster.node_timeout
            await asyncio.sleep(timeout / 5)
            try:
                renewed = await self._renew(timeout)
                self._renewed = time.monotonic()
                if self.fenced:
                    self.fenced = False
                    log.warning("event=deploy_node_unfenced node=%s", self.node)
                    self.wakeups.fire(QUEUE)
                if not renewed:
                    await self._lease_lost()
                if time.monotonic() - self._healthy_since >= timeout:
                    for deploy in await self.store.expire_nodes(timeout):
                        self._interrupted(deploy)
                await self._check_cancels()
            except StoreUnavailable:
                self._healthy_since = time.monotonic()
            except Exception:
                self._healthy_since = time.monotonic()
                log.exception("event=deploy_lease_error")
            if not self.fenced and time.monotonic() - self._renewed > timeout / 2:
                self._fence()

    async def _renew(self, lapse: float) -> bool:
        """Renew the lease; while a renewal hangs (a registry locked or unreachable), see
        every fifth of the timeout whether this process must fence itself meanwhile."""
        renewal = asyncio.ensure_future(self.store.renew_node(self.node))
        while True:
            done, _ = await asyncio.wait({renewal}, timeout=lapse / 5)
            if done:
                return renewal.result()
            self._healthy_since = time.monotonic()
            if not self.fenced and time.monotonic() - self._renewed > lapse / 2:
                self._fence()

    def _fence(self) -> None:
        self.fenced = True
        log.error(
            "event=deploy_node_fenced node=%s running=%d reason=no_lease_renewal",
            self.node,
            self._running(),
        )
        self._stop_all("this gateway lost touch with the registry")

    async def _lease_lost(self) -> None:
        """The others declared this process gone (it was cut off longer than the timeout):
        what it ran is recorded as interrupted already, so it stops it and joins again."""
        log.error("event=deploy_lease_lost node=%s running=%d", self.node, self._running())
        self._stop_all("this gateway lost touch with the others")
        await self.join()
