"""What each part of the domain facade reads at use: the facade's config, store and repositories."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Config
from ..git.repos import Repositories
from ..store import Store

if TYPE_CHECKING:
    from .facade import Domain


class Part:
    """One aggregate's operations (accounts, apps, tokens, deploy records, access).

    It reads the facade's attributes at each use, never a copy: a reload that gives the
    facade a new config reaches every part."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    @property
    def config(self) -> Config:
        return self.domain.config

    @property
    def store(self) -> Store:
        return self.domain.store

    @property
    def repos(self) -> Repositories:
        return self.domain.repos
