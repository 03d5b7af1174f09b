"""Running and checking the gateway: `serve`, `check`, `config show`, `db`, `completion`."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, TextIO

from .. import __version__, config, dbtools, logs
from ..errors import ConfigError, GatewayError
from ..git import gitbin
from ..ssh import certs
from .common import log


def serve(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    from .. import workers

    if args.worker_of is not None:
        return _serve_worker(workers.WorkerRole.from_json(args.worker_of), cfg)
    count = args.workers if args.workers is not None else cfg.server.workers
    count = count or workers.cores()
    logs.setup(cfg.log.level, cfg.log.format)
    log.info(
        "event=starting version=%s config=%s workers=%d",
        __version__,
        cfg.source if cfg.source else "embedded-defaults",
        count,
    )
    if count > 1:
        return asyncio.run(workers.Supervisor(cfg, count, cfg.source).run())
    from ..app import Gateway  # the SSH stack is only loaded for the server

    try:
        asyncio.run(Gateway(cfg).serve_forever())
    except OSError as exc:
        host, port = cfg.ssh.listen
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return 0


def _serve_worker(role: Any, cfg: config.Config) -> int:
    """One of `serve --workers N`'s processes, started by the supervisor (gateway.workers)."""
    role.die_with_parent()
    logs.setup(cfg.log.level, cfg.log.format, worker=role.index)
    from ..app import Gateway

    asyncio.run(Gateway(cfg, worker=role).serve_forever())
    return 0


def worker_count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= config.MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 0 (one per CPU core) to {config.MAX_WORKERS}"
        )
    return int(text)


def config_show(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    out.write(config.render(cfg) + "\n")
    return 0


def check(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    # A test sandbox per configured command pipeline; which deploy limits this host enforces.
    from ..deploys import confine, sandbox

    git = gitbin.locate(cfg.git.binary)
    try:
        cas = certs.load_cas(cfg.ssh.trusted_user_ca_keys)
        certs.Revocations(cfg.ssh.revoked_certificates)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[ssh] certificates: {exc}") from None
    warnings = asyncio.run(sandbox.check(cfg))
    for warning in warnings:
        out.write(f"warning: {warning}\n")
    built = [label for label, box in sandbox.sandboxes(cfg).items() if box.enabled]
    sandboxed = f"; deploy sandbox ok for {', '.join(built)}" if built else ""
    trusted = f"; {len(cas)} trusted user CA key(s)" if cas else ""
    out.write(
        f"config ok ({cfg.source or 'embedded defaults'}); git {git.version_text} at {git.path}"
        f"{sandboxed}{trusted}\n"
    )
    sizes = [box.limits.build_size for box in sandbox.sandboxes(cfg).values() if box.enabled]
    for line in confine.report(sizes):
        out.write(f"{line}\n")
    # Read only: `check` may run beside an older gateway on the same registry (see probe).
    out.write(f"{asyncio.run(dbtools.probe(cfg))}\n")
    return 0


# -- argument parsing --
