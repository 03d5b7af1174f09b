"""What every CLI command shares: output as a table or JSON, the facade opened per command,
and the actor the audit trail records."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from .. import config, control, tables
from ..domain.facade import Domain

log = logging.getLogger("gateway.cli")

EXPIRES_HELP = (
    "when it stops working: a duration (90d, 12h, 4w), a date (2027-01-31: from 00:00 UTC) "
    "or an ISO 8601 time; default: never"
)
# The actor recorded in the audit trail for changes made with this CLI.
OPERATOR = "operator"
# Seconds to wait for the running gateway's answer about its port.
PORT_QUESTION_TIMEOUT = 5.0


def table_out(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    out.write(tables.render(rows, headers))


def json_out(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


# -- command implementations: each gets the parsed args, the config and an output stream --


async def with_domain(cfg: config.Config, action: Callable[[Domain], Awaitable[Any]]) -> Any:
    async with Domain.open(cfg) as domain:
        return await action(domain)


def as_shown(cfg: config.Config) -> config.Config:
    """The configuration as users are shown it (clone URLs): with `[ssh] listen` on port 0,
    the port the running gateway was given, asked over its control socket; with no gateway
    running, port 0 as configured."""
    host, port = cfg.ssh.listen
    if port != 0:
        return cfg
    try:
        replies = control.request(
            cfg.storage.control_socket, {"op": "ssh_port"}, timeout=PORT_QUESTION_TIMEOUT
        )
        bound = int("".join(str(r.get("out", "")) for r in replies).strip())
    except (control.NotRunning, control.ControlError, OSError, ValueError):
        return cfg
    if not 0 < bound < 65536:
        return cfg
    settings = config.Settings(cfg)
    settings.bound([(host, bound)])
    return settings.current
