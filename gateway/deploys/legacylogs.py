"""Deploy log files of earlier versions (`<log_dir>/<id>.log`): taken into the registry once."""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from .. import executors
from ..domain.deploylog import legacy_log_ids, read_legacy_log
from ..store import Store

log = logging.getLogger("gateway.deploys")


async def import_legacy_logs(store: Store, log_dir: Path, log_limit: int) -> None:
    """The log of a deploy still recorded goes into the registry (once); every such file is
    then set aside, so that none is ever read again, whatever its id."""
    ids = await executors.run(legacy_log_ids, log_dir)
    if not ids:
        return
    await store.reserve_deploy_ids(ids[-1])
    target = log_dir / f"imported-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    await executors.run(target.mkdir, 0o700)
    imported = moved = 0
    for deploy_id in ids:
        name = f"{deploy_id}.log"
        try:
            # Taken first, by rename: of processes starting together, one imports it.
            await executors.run(os.rename, log_dir / name, target / name)
        except FileNotFoundError:
            continue
        moved += 1
        if await store.get_deploy(deploy_id) and not await store.deploy_log(deploy_id, 0, 1):
            text = await executors.run(read_legacy_log, target, deploy_id, log_limit)
            if text:
                await store.append_deploy_log(deploy_id, text, keep=log_limit)
                imported += 1
    log.info("event=deploy_logs_imported imported=%d files=%d moved_to=%s", imported, moved, target)
