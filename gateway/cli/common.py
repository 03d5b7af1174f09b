"""What every CLI command shares: output as a table or JSON, the facade opened per command,
and the actor the audit trail records."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from .. import config, tables
from ..domain.facade import Domain

log = logging.getLogger("gateway.cli")

# The actor recorded in the audit trail for changes made with this CLI.
EXPIRES_HELP = (
    "when it stops working: a duration (90d, 12h, 4w), a date (2027-01-31: from 00:00 UTC) "
    "or an ISO 8601 time; default: never"
)
OPERATOR = "operator"


def table_out(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    out.write(tables.render(rows, headers))


def json_out(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


# -- command implementations: each gets the parsed args, the config and an output stream --


async def with_domain(cfg: config.Config, action: Callable[[Domain], Awaitable[Any]]) -> Any:
    async with Domain.open(cfg) as domain:
        return await action(domain)
