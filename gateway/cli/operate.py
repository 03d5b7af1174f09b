"""Running and checking the gateway: `serve`, `check`, `config show`, `db`, `completion`."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, TextIO

from .. import __version__, config, dbtools, fstype, logs
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
    repositories, stale = repositories_report(cfg)
    if stale:
        warnings.append(repositories)
    for warning in warnings:
        out.write(f"warning: {warning}\n")
    built = [label for label, box in sandbox.sandboxes(cfg).items() if box.enabled]
    sandboxed = f"; deploy sandbox ok for {', '.join(built)}" if built else ""
    trusted = f"; {len(cas)} trusted user CA key(s)" if cas else ""
    out.write(
        f"config ok ({cfg.source or 'embedded defaults'}); git {git.version_text} at {git.path}"
        f"{sandboxed}{trusted}\n"
    )
    if repositories and not stale:
        out.write(f"{repositories}\n")
    sizes = [box.limits.build_size for box in sandbox.sandboxes(cfg).values() if box.enabled]
    for line in confine.report(sizes):
        out.write(f"{line}\n")
    # Read only: `check` may run beside an older gateway on the same registry (see probe).
    out.write(f"{asyncio.run(dbtools.probe(cfg))}\n")
    return 0


def repositories_report(cfg: config.Config) -> tuple[str, bool]:
    """What `check` says of the repositories root: ("", False) on a local filesystem; on a
    network one, an ok line, or a warning (True) when this node forwards nothing, since a
    node's cache then hides another's writes (issue 22: stale refs for sshfs's 20 s)."""
    repos = cfg.storage.repos
    kind = fstype.filesystem_of(repos)
    if not fstype.is_network(kind):
        return "", False
    cluster = cfg.cluster
    if cluster.listen is not None and cluster.forward != "never":
        return f"repositories ok ({kind}: each repository served by its home node)", False
    why = '[cluster] forward = "never"' if cluster.listen else "[cluster] listen is not set"
    return (
        f"[storage] repos ({repos}) is on a network filesystem ({kind}) and {why}: this "
        "node serves every repository itself, and its cache can hide what other nodes wrote "
        '(stale refs, "not our ref", failed clones); set [cluster] listen and peers on every '
        'node and keep forward = "auto" (see docs/cluster.md)',
        True,
    )


# -- argument parsing --
