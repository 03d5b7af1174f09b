"""Deploy commands over SSH: `deploys APP`, `logs APP [ID] [--follow]`, `cancel ID`."""

from __future__ import annotations

import asyncio
import contextlib

from ... import tables
from ...domain.access import authorize
from ...errors import AccessDenied, GatewayError
from ...git.bridge import CLIENT_GONE
from ...models import Role
from ...textsafe import TerminalStream, terminal_safe
from . import Context, Invocation

# Seconds the last bytes of a followed log may take to reach a watcher.
FLUSH_TIMEOUT = 5.0


class DeployNotFound(GatewayError):
    def __init__(self, text: str) -> None:
        super().__init__(f"deploy {text} not found or access denied")


async def _write(ctx: Context, text: str) -> None:
    ctx.channel.stdout.write(text.encode("utf-8", "replace"))
    await ctx.channel.stdout.drain()


async def list_deploys(ctx: Context, inv: Invocation) -> int:
    app, _ = await authorize(ctx.store, ctx.identity, inv.app, Role.READ)
    deploys = await ctx.store.list_deploys(app.name)
    if not deploys:
        await _write(ctx, f"no deploys of {app.name} yet\n")
        return 0
    await _write(ctx, tables.render(tables.deploy_rows(deploys), tables.DEPLOY_HEADERS))
    return 0


async def logs(ctx: Context, inv: Invocation) -> int:
    app, _ = await authorize(ctx.store, ctx.identity, inv.app, Role.READ)
    _, wanted, follow = inv.args
    if wanted:
        deploy = await ctx.store.get_deploy(int(wanted))
        if deploy is None or deploy.app_id != app.id:
            raise DeployNotFound(f"#{wanted} of {app.name}")
    else:
        latest = await ctx.store.list_deploys(app.name, limit=1)
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
    current = await ctx.store.get_deploy(deploy.id) or deploy
    if not current.status.finished:
        await say(f"deploy #{current.id} is {current.status.value}; add --follow to watch it\n")
    return 0


async def cancel(ctx: Context, inv: Invocation) -> int:
    deploy_id = int(inv.args[0])
    deploy = await ctx.store.get_deploy(deploy_id)
    if deploy is None:
        raise DeployNotFound(f"#{deploy_id}")
    try:
        await authorize(ctx.store, ctx.identity, deploy.app_name, Role.WRITE)
    except AccessDenied:
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
