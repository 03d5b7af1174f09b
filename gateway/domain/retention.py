"""Retention: old audit events and finished deploy records (their logs with them) are pruned."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..config import Config
from ..store import Store

log = logging.getLogger("gateway.retention")

# Rows deleted per transaction, so a first prune of a large backlog never holds the
# registry's write lock for long.
AUDIT_BATCH = 5000
DEPLOY_BATCH = 500


@dataclass(frozen=True)
class Pruned:
    audit: int = 0
    deploys: int = 0


def _cutoff(days: float, now: datetime) -> datetime:
    return now - timedelta(days=days)


async def prune(store: Store, config: Config, now: datetime | None = None) -> Pruned:
    """Apply `[audit] retention` and `[deploy] retention`/`keep_last` once."""
    now = now or datetime.now(UTC)
    audit = deploys = 0
    if config.audit.retention > 0:
        before = _cutoff(config.audit.retention, now)
        while (count := await store.prune_audit(before, AUDIT_BATCH)) > 0:
            audit += count
            if count < AUDIT_BATCH:
                break
    settings = config.deploy
    if settings.retention > 0:
        before = _cutoff(settings.retention, now)
        while ids := await store.prune_deploys(before, settings.keep_last, DEPLOY_BATCH):
            deploys += len(ids)  # their log chunks go with them
            if len(ids) < DEPLOY_BATCH:
                break
    if audit or deploys:
        log.info("event=pruned audit=%d deploys=%d", audit, deploys)
    return Pruned(audit, deploys)
