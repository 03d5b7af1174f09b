"""A registry in memory: the Store contract, pure Python, no SQL (a test double that keeps
the real rules: unique names and keys, ids never handed out twice, cascades, ordering,
transactions that roll back).

One part per aggregate (accounts, apps, deploys, queue, homes, tokens and audit), composed
here; stores made with `sharing` see one registry, as gateway processes see one database.
"""

from __future__ import annotations

from ...errors import StoreUnavailable
from .. import packaged_migrations
from .base import Registry
from .homes import HomesMemory
from .queue import QueueMemory
from .tokens import AuditMemory, TokensMemory


class MemoryStore(QueueMemory, HomesMemory, TokensMemory, AuditMemory):
    """Every aggregate's part in one Store."""

    def __init__(self, registry: Registry | None = None) -> None:
        super().__init__(registry)
        self._closed = False

    def sharing(self) -> MemoryStore:
        """Another store on this one's registry (another process, as tests need them)."""
        return MemoryStore(self._registry)

    async def schema_version(self) -> int:
        # The schema it models: the newest the SQL backends ship.
        return len(packaged_migrations("gateway.store"))

    async def ping(self) -> None:
        if self._closed:
            raise StoreUnavailable("the memory store is closed")

    async def close(self) -> None:
        self._closed = True


__all__ = ["MemoryStore", "Registry"]
