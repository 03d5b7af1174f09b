"""Retention: old audit events, finished deploy records and their log files are pruned."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from . import executors
from .config import Config
from .deploylog import log_path
from .store import Store

log = logging.getLogger("gateway.retention")

# Rows deleted per transaction, so a first prune of a large backlog never holds the
# registry's write lock for long.
AUDIT_BATCH = 5000
DEPLOY_BATCH = 500


@dataclass(frozen=True)
class Pruned:
    audit: int = 0
    deploys: int = 0
    logs: int = 0


def _cutoff(days: float, now: datetime) -> str:
    return (now - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def prune(store: Store, config: Config, now: datetime | None = None) -> Pruned:
    """Apply `[audit] retention` and `[deploy] retention`/`keep_last` once."""
    now = now or datetime.now(UTC)
    audit = deploys = logs = 0
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
            deploys += len(ids)
            # File removal is blocking I/O: kept off the event loop.
            logs += await executors.run(_remove_logs, settings.log_dir, ids)
            if len(ids) < DEPLOY_BATCH:
                break
        logs += await _remove_orphan_logs(
            store, settings.log_dir, now - timedelta(days=settings.retention)
        )
    if audit or deploys or logs:
        log.info("event=pruned audit=%d deploys=%d logs=%d", audit, deploys, logs)
    return Pruned(audit, deploys, logs)


def _remove_logs(log_dir: Path, ids: list[int]) -> int:
    removed = 0
    for deploy_id in ids:
        with contextlib.suppress(FileNotFoundError):
            log_path(log_dir, deploy_id).unlink()
            removed += 1
    return removed


async def _remove_orphan_logs(store: Store, log_dir: Path, older_than: datetime) -> int:
    """Logs of deploys whose record is gone (their app was removed), once past retention."""
    candidates = await executors.run(_old_log_ids, log_dir, older_than.timestamp())
    if not candidates:
        return 0
    kept = await store.existing_deploy_ids(candidates)
    return await executors.run(_remove_logs, log_dir, [i for i in candidates if i not in kept])


def _old_log_ids(log_dir: Path, before: float) -> list[int]:
    ids = []
    try:
        entries = list(os.scandir(log_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        stem, dot, ext = entry.name.partition(".")
        if dot and ext == "log" and stem.isdigit() and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime < before:
                    ids.append(int(stem))
    return ids
