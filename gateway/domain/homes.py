"""Which node serves each app's repository (its home): this one, or another to forward to."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import fstype
from ..config import Config
from ..errors import GatewayError
from ..models import App, Home
from .part import Part

if TYPE_CHECKING:
    from .facade import Domain

log = logging.getLogger("gateway.homes")


class HomeUnavailable(GatewayError):
    """The app's home node cannot be told or reached: nothing ran, the user may retry."""

    def __init__(self, app: str) -> None:
        super().__init__(
            f"repository '{app}' is temporarily unavailable (its node is not answering): "
            "retry in a few seconds"
        )


def node_name(config: Config) -> str:
    """This machine's name among the nodes: what the workers of one machine share."""
    return config.cluster.node_name or socket.gethostname()


def forwarding(config: Config) -> bool:
    """Whether this node serves each repository on its home node only ([cluster] forward):
    always with a listener; auto, with a listener and repositories on a network filesystem,
    whose caches would show each node a different repository (docs/cluster.md)."""
    cluster = config.cluster
    if cluster.listen is None or cluster.forward == "never":
        return False
    if cluster.forward == "always":
        return True
    return fstype.is_network(fstype.filesystem_of(config.storage.repos))


@dataclass(frozen=True)
class Route:
    """Where one operation runs: here (home None), or forwarded to `home`."""

    home: Home | None

    @property
    def here(self) -> bool:
        return self.home is None


HERE = Route(None)


class Homes(Part):
    """Each app's home node, as this process takes part in it.

    Off (every operation here) until the composition root calls `serve_as` with this
    process's row in the nodes table: a single node, or nodes on one local disk, never claim
    anything (`forward` auto or never)."""

    def __init__(self, domain: Domain) -> None:
        super().__init__(domain)
        self.node: str | None = None
        self.draining = False  # takes no new home from the other nodes
        self.released = False  # the drain gave up the idle homes
        # Operations running here per app: a drain keeps those apps' homes until they end.
        self._busy: collections.Counter[int] = collections.Counter()

    @property
    def enabled(self) -> bool:
        return self.node is not None

    def serve_as(self, node: str) -> None:
        self.node = node

    async def route(self, app: App) -> Route:
        """Where `app`'s operations run now; an app without a home gets this node.
        HomeUnavailable when this process may take none (declared gone: it joins again)."""
        if self.node is None:
            return HERE
        # A read first: most operations find the home taken (a claim is a write).
        home = await self.store.home_of(app.id) or await self._claim(app)
        if home is None:
            log.warning("event=home_unclaimable app=%s node=%s", app.name, self.node)
            raise HomeUnavailable(app.name)
        return HERE if home.name == node_name(self.config) else Route(home)

    async def serves_here(self, app: App) -> bool:
        """Whether an operation forwarded by another node runs here: this machine is the
        app's home, or becomes it (none yet, and this node is not draining)."""
        if self.node is None:
            return True
        home = await self.store.home_of(app.id)
        if home is None and not self.draining:
            home = await self._claim(app)
        return home is not None and home.name == node_name(self.config)

    async def _claim(self, app: App) -> Home | None:
        """Take the app's home if it has none (a race gives it to one node); logged when this
        node took it (the first operation since start, or since its last home left)."""
        assert self.node is not None  # noqa: S101 - callers check
        home = await self.store.claim_home(app.id, self.node)
        if home is not None and home.node == self.node:
            log.info("event=home_taken app=%s node=%s", app.name, self.node)
        return home

    async def adopt(self, app: App) -> None:
        """A repository this machine has just created is first served by this machine, whose
        cache has seen it being written (another node's may still hold the old name's view):
        a node of this name takes the home (the CLI's process is none; a node is)."""
        if not forwarding(self.config):
            return
        mine = node_name(self.config)
        nodes = [n for n in await self.store.list_nodes() if n.name == mine]
        if self.node is not None and any(n.id == self.node for n in nodes):
            nodes = [n for n in nodes if n.id == self.node]
        for node in nodes:
            if await self.store.claim_home(app.id, node.id) is not None:
                return

    @contextlib.contextmanager
    def busy(self, app_id: int) -> Iterator[None]:
        """Count one operation of `app_id` running here while the block runs."""
        self._busy[app_id] += 1
        try:
            yield
        finally:
            self._busy[app_id] -= 1
            if not self._busy[app_id]:
                del self._busy[app_id]

    async def release(self) -> int:
        """A drain: give up the homes of the apps with nothing running here (the others when
        their last operation ends, or when this process leaves); from now on, take no new
        home from the other nodes."""
        self.draining = True
        if self.node is None:
            return 0
        idle = [a for a in await self.store.homes_of(self.node) if a not in self._busy]
        released = await self.store.release_homes(self.node, idle)
        self.released = True
        log.info(
            "event=homes_released node=%s released=%d kept=%d",
            self.node,
            released,
            len(self._busy),
        )
        return released

    async def finished(self, app_id: int) -> None:
        """After an operation: once the drain has released the idle homes, an app whose last
        operation here just ended goes too."""
        if self.released and self.node is not None and app_id not in self._busy:
            await self.store.release_homes(self.node, [app_id])

    async def hand_over(self, seconds: float) -> None:
        """A drain: keep serving the apps this process is home to for `seconds` more (what is
        left of [cluster] cache_seconds since the drain began), so that whatever the next
        home's cache kept from before has expired by the time it takes them (docs/cluster.md).
        """
        if seconds > 0 and self.node is not None and await self.store.homes_of(self.node):
            log.info("event=homes_handover seconds=%.1f", seconds)
            await asyncio.sleep(seconds)
