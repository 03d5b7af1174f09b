"""The one domain facade every front end (SSH, HTTP, CLI) calls, and that audits inside itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..config import Config, Settings
from ..git.repos import Repositories
from ..models import AuditEvent
from ..store import Store, open_store
from .access import Access
from .accounts import Accounts
from .apps import Apps
from .homes import Homes
from .records import DeployRecords
from .tokens import Tokens


class Domain:
    """Accounts, apps, tokens, deploy records and access, one part per aggregate.

    Every rule, message and audit event lives in a part, so the SSH commands, the API, the
    keys page and the CLI cannot drift apart on one; none of them calls the store itself.
    The composition root (gateway.app, or `open` for the CLI) gives it the store.
    """

    def __init__(
        self, config: Config | Settings, store: Store, repos: Repositories | None = None
    ) -> None:
        # The running gateway's Settings: a reload reaches every part at once (the default
        # deploy branch, max_keys_per_user), and clone URLs name the port actually bound.
        self.settings = config if isinstance(config, Settings) else Settings(config)
        self.store = store
        current = self.settings.current
        self.repos = repos or Repositories(
            current.storage.repos,
            current.git.max_input_size,
            git=current.git.binary,
            max_commit_size=current.limits.max_commit_size,
        )
        self.accounts = Accounts(self)
        self.apps = Apps(self)
        self.tokens = Tokens(self)
        self.records = DeployRecords(self)
        self.access = Access(self)
        self.homes = Homes(self)

    @property
    def config(self) -> Config:
        return self.settings.current

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config) -> AsyncIterator[Domain]:
        """The facade over the configured registry, closed after use (the CLI's: one
        command, one connection)."""
        store = await open_store(config.storage.database)
        try:
            yield cls(config, store)
        finally:
            await store.close()

    async def ping(self) -> None:
        """Raise unless the registry answers (the readiness probe)."""
        await self.store.ping()

    async def audit_trail(
        self, app: str | None = None, actor: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        """The most recent audit events, optionally of one app and/or one actor."""
        return await self.store.list_audit(app=app, actor=actor, limit=limit)
