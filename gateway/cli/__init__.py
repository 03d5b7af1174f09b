"""Command-line front end: `git-gateway serve` and the operator's user/key/app commands."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from .. import config, control, logs, umask
from ..errors import GatewayError
from ..textsafe import terminal_safe
from .parser import build_parser, require_key_source

__all__ = ["build_parser", "main"]


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    logs.capture_warnings()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        require_key_source(args)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help/--version exit 0
        return int(exc.code or 0)
    # Whatever umask the gateway is started with, what it creates (the registry and its
    # -wal/-shm files, repositories, deploy logs, the control socket) is private. Restored
    # afterwards for callers that run commands in-process.
    previous = umask.make_private()
    try:
        # Commands that never read the configuration work even where it is broken.
        cfg = config.load(getattr(args, "config", None)) if args.needs_config else None
        result = args.func(args, cfg, out)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except GatewayError as exc:
        err.write(f"error: {terminal_safe(str(exc))}\n")
        return exc.exit_code
    except control.ControlError as exc:
        err.write(f"error: {terminal_safe(str(exc))}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    finally:
        os.umask(previous)
