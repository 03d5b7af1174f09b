"""The single table of allowed commands and the handler that serves each."""

from __future__ import annotations

from . import Context, Handler, Invocation, account, deploys, info
from . import git as git_commands

HANDLERS: dict[str, Handler] = {
    "info": info.run,
    "whoami": account.whoami,
    "keys": account.keys,
    "help": info.help_text,
    "git-upload-pack": git_commands.run,
    "git-receive-pack": git_commands.run,
    "git-upload-archive": git_commands.run,
    "deploys": deploys.list_deploys,
    "logs": deploys.logs,
    "cancel": deploys.cancel,
}


async def execute(ctx: Context, inv: Invocation) -> int:
    return await HANDLERS[inv.command](ctx, inv)
