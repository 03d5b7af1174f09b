"""The offline database tools: `db migrate`, `db copy` and the probe `check` prints.

They work on the registry database itself (its schema, its rows as a whole), not on what it
holds by the domain's rules, and run with no gateway: so they use gateway.store directly,
where every other front end goes through the domain facade (pyproject.toml's import
contract lets this module alone do so).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import TextIO

from . import config, tables
from .dburl import is_postgres, redact
from .errors import UsageError
from .store import open_store, transfer
from .store import probe as store_probe


async def migrate(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    store = await open_store(cfg.storage.database)  # opening applies what is pending
    try:
        version = await store.schema_version()
        applied = getattr(store, "applied", 0)
    finally:
        await store.close()
    out.write(
        f"registry {redact(cfg.storage.database)}: schema version {version} "
        f"({applied} migration{'s' if applied != 1 else ''} applied now)\n"
    )
    return 0


async def copy(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    source_path = args.source or cfg.storage.database
    if is_postgres(source_path):
        raise UsageError(
            "db copy reads a SQLite registry: [storage] database (or $GATEWAY_DATABASE_URL) "
            "names a PostgreSQL one; give the SQLite file with --from PATH"
        )
    if not is_postgres(args.to):
        raise UsageError("db copy --to needs a postgresql:// URL")
    if not await asyncio.to_thread(os.path.isfile, source_path):
        raise UsageError(f"no SQLite registry at {source_path}")
    source = await open_store(source_path)
    try:
        target = await open_store(args.to)
        try:
            report = await transfer.copy_registry(source, target)
        finally:
            await target.close()
    finally:
        await source.close()
    out.write(f"copied {source_path} -> {redact(args.to)}\n")
    rows = [list(row) for row in transfer.report_rows(report)]
    out.write(tables.render(rows, ["TABLE", "SQLITE ROWS", "POSTGRESQL ROWS", "NEXT ID AFTER"]))
    out.write(f"checksum sqlite:     {report.source.checksum}\n")
    out.write(f"checksum postgresql: {report.target.checksum}\n")
    return 0


async def probe(cfg: config.Config) -> str:
    """The registry's state in one line, read only: `check` may run beside an older gateway
    on the same registry (see gateway.store.probe)."""
    return (await store_probe.probe(cfg.storage.database)).text()
