"""Deploys from the command line (list, show, logs, cancel) and the audit trail."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import TextIO

from .. import config, control, tables
from ..domain.facade import Domain
from ..domain.shapes import (
    audit_dict,
    deploy_dict,
    deploy_record_dict,
)
from ..tables import shown
from ..textsafe import TerminalStream, terminal_safe
from .common import OPERATOR, json_out, table_out, with_domain


async def deploy_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        deploys = await domain.records.list_deploys(args.app, limit=args.limit)
        if args.json:
            json_out([deploy_dict(d) for d in deploys], out)
        else:
            table_out(tables.deploy_rows(deploys), tables.DEPLOY_HEADERS, out)
        return 0

    return await with_domain(cfg, act)


async def deploy_show(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        record = await domain.records.deploy_record(args.id)
        deploy, deliveries = record.deploy, record.deliveries
        if args.json:
            json_out(deploy_record_dict(deploy, deliveries), out)
            return 0
        # Subject, author and reason are the tenant's text: shown escaped, one line each.
        for key, value in deploy_dict(deploy).items():
            text = tables.one_line("" if value is None else str(value))
            out.write(f"{key + ':':<17}{text}\n")
        for d in deliveries:
            result = d.status_code if d.status_code is not None else tables.one_line(d.error)
            out.write(
                f"webhook attempt {d.attempt}: {result} in {d.duration_ms} ms "
                f"at {shown(d.created_at)}\n"
            )
        return 0

    return await with_domain(cfg, act)


def deploy_logs(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    deploy = asyncio.run(with_domain(cfg, lambda d: d.records.get_deploy(args.id)))
    # The log is the deploy's own output: its control sequences are shown, never obeyed.
    if args.follow and not deploy.status.finished:
        stream = TerminalStream()
        try:
            code = 1
            for reply in control.request(
                cfg.storage.control_socket, {"op": "follow", "deploy": args.id}
            ):
                if "out" in reply:
                    out.write(stream.feed(reply["out"]))
                    out.flush()
                if "exit" in reply:
                    code = int(reply["exit"])
            out.write(stream.flush())
            return code
        except control.NotRunning:
            # No gateway here: another node may run it; follow it in the registry.
            return asyncio.run(with_domain(cfg, lambda d: _follow_stored(cfg, d, args.id, out)))
    out.write(
        terminal_safe(asyncio.run(with_domain(cfg, lambda d: d.records.deploy_log(deploy.id))))
    )
    if not deploy.status.finished:
        out.write(f"deploy #{deploy.id} is {deploy.status.value}\n")
    if args.follow:
        return 0 if deploy.status.ok else 1
    return 0


def deploy_cancel(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    try:
        code = 1
        message = {"op": "cancel", "deploy": args.id, "by": OPERATOR}
        for reply in control.request(cfg.storage.control_socket, message, timeout=120):
            if "out" in reply:
                out.write(terminal_safe(reply["out"]))
            if "exit" in reply:
                code = int(reply["exit"])
    except control.NotRunning:
        pass
    else:
        return code  # the running gateway cancelled it, and audited who asked

    from ..deploys import cancel_offline

    async def offline(domain: Domain) -> int:
        deploy = await cancel_offline(domain.store, args.id, actor=OPERATOR)
        if deploy.status.finished:
            out.write(f"deploy #{deploy.id}: cancelled (no gateway runs here)\n")
        else:
            out.write(f"deploy #{deploy.id}: cancel asked of {deploy.runner}, which runs it\n")
        return 0

    return asyncio.run(with_domain(cfg, offline))


async def _follow_stored(cfg: config.Config, domain: Domain, deploy_id: int, out: TextIO) -> int:
    """Stream a deploy's log from the registry to its end, polling (no gateway runs here to
    announce new output). Following is gateway.deploys' business: its watcher is given the
    facade's store, as DeployService is by the app."""
    from ..deploys.queue import Wakeups
    from ..deploys.watch import watch

    stream = TerminalStream()

    async def say(text: str) -> None:
        out.write(stream.feed(text))
        out.flush()

    final = await watch(
        domain.store, Wakeups(), deploy_id, say, asyncio.Event(), until_done=True, poll=lambda: 0.5
    )
    out.write(stream.flush())
    if final is None:  # pragma: no cover - until_done waits for the end
        return 1
    from ..deploys.messages import final_line

    out.write(final_line(cfg, final, final.elapsed))
    return 0 if final.status.ok else 1


async def audit_list(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    async def act(domain: Domain) -> int:
        events = await domain.audit_trail(app=args.app, actor=args.user, limit=args.limit)
        if args.json:
            json_out([audit_dict(e) for e in events], out)
            return 0
        rows = [
            [
                shown(e.at),
                e.event,
                e.actor or "-",
                e.app or "-",
                e.source or "-",
                e.fingerprint or "-",
                " ".join(f"{k}={v}" for k, v in json.loads(e.detail).items()),
            ]
            for e in events
        ]
        table_out(rows, ["AT", "EVENT", "ACTOR", "APP", "SOURCE", "FINGERPRINT", "DETAIL"], out)
        return 0

    return await with_domain(cfg, act)
