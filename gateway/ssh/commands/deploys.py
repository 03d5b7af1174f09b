"""Deploy commands over SSH: `deploys APP`, `logs APP [ID] [--follow]`, `cancel ID`."""

from __future__ import annotations

import asyncio
import contextlib

from ... import tables
from ...errors import AccessDenied, GatewayError, NotFound
from ...git.bridge import CLIENT_GONE
from ...models import Role
from ...textsafe import TerminalStream, terminal_safe
from .base import Command, Context, Invocation, Usage, app_only, deploy_id, repo_path_to_app

# Seconds the last bytes of a followed log may take to reach a watcher.
FLUSH_TIMEOUT = 5.0


class DeployNotFound(GatewayError):
    def __init__(self, text: str) -> None:
        super().__init__(f"deploy {text} not found or access denied")


async def _write(ctx: Context, text: str) -> None:
    ctx.channel.stdout.write(text.encode("utf-8", "replace"))
    await ctx.channel.stdout.drain()


async def list_deploys(ctx: Context, inv: Invocation) -> int:
    app, _ = await ctx.domain.access.authorize(ctx.identity, inv.app, Role.READ)
    deploys = await ctx.domain.records.list_deploys(app.name)
    if not deploys:
        await _write(ctx, f"no deploys of {app.name} yet\n")
        return 0
    await _write(ctx, tables.render(tables.deploy_rows(deploys), tables.DEPLOY_HEADERS))
    return 0


async def logs(ctx: Context, inv: Invocation) -> int:
    app, _ = await ctx.domain.access.authorize(ctx.identity, inv.app, Role.READ)
    records = ctx.domain.records
    _, wanted, follow = inv.args
    if wanted:
        try:
            deploy = await records.get_deploy(int(wanted))
        except NotFound:
            raise DeployNotFound(f"#{wanted} of {app.name}") from None
        if deploy.app_id != app.id:
            raise DeployNotFound(f"#{wanted} of {app.name}")
    else:
        latest = await records.list_deploys(app.name, limit=1)
        if not latest:
            raise GatewayError(f"no deploys of {app.name} yet")
        deploy = latest[0]

    # A deploy's output is the tenant's: shown escaped, never obeyed by the terminal.
    stream = TerminalStream()

    async def say(text: str) -> None:
        await _write(ctx, stream.feed(text))

    if follow:
        final = await ctx.deploys.follow(deploy.id, say)
        rest = stream.flush()
        if rest:
            # A watcher that stopped reading was dropped by follow(): do not wait on it here.
            with contextlib.suppress(TimeoutError, *CLIENT_GONE):
                await asyncio.wait_for(_write(ctx, rest), FLUSH_TIMEOUT)
        return 0 if final.status.ok else 1
    await _write(ctx, terminal_safe(await ctx.deploys.log_text(deploy.id)))
    try:
        current = await records.get_deploy(deploy.id)
    except NotFound:  # removed with its app meanwhile
        current = deploy
    if not current.status.finished:
        await say(f"deploy #{current.id} is {current.status.value}; add --follow to watch it\n")
    return 0


async def cancel(ctx: Context, inv: Invocation) -> int:
    deploy_id = int(inv.args[0])
    try:
        deploy = await ctx.domain.records.get_deploy(deploy_id)
        await ctx.domain.access.authorize(ctx.identity, deploy.app_name, Role.WRITE)
    except (NotFound, AccessDenied):
        # The same answer for a deploy that does not exist and one of an app you cannot
        # reach: ids must not reveal other tenants' deploys.
        raise DeployNotFound(f"#{deploy_id}") from None
    final = await ctx.deploys.cancel(
        deploy_id, ctx.identity.user_name, fingerprint=ctx.identity.fingerprint, source=ctx.peer
    )
    await _write(
        ctx,
        terminal_safe(
            f"deploy #{final.id} of {final.app_name}: {final.status.value} ({final.reason})\n"
        ),
    )
    return 0


def _logs(words: list[str]) -> tuple[str, ...]:
    follow = [w for w in words[1:] if w in ("--follow", "-f")]
    rest = [w for w in words[1:] if w not in ("--follow", "-f")]
    if not 1 <= len(words) <= 3 or len(follow) > 1 or len(rest) > 1:
        raise Usage
    number = deploy_id(rest[0]) if rest else ""
    return (repo_path_to_app(words[0]), number, "follow" if follow else "")


def _cancel(words: list[str]) -> tuple[str, ...]:
    if len(words) != 1:
        raise Usage
    return (deploy_id(words[0]),)


DEPLOYS = Command(
    "deploys", ("deploys APP",), "an app's recent deploys", app_only, list_deploys, takes_app=True
)
LOGS = Command(
    "logs",
    ("logs APP [ID] [--follow]",),
    "a deploy's log (the latest by default)",
    _logs,
    logs,
    takes_app=True,
)
CANCEL = Command("cancel", ("cancel ID",), "cancel a queued or running deploy", _cancel, cancel)
