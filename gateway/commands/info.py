"""The command-less session (who the key belongs to, which apps it reaches) and `help`."""

from __future__ import annotations

from . import COMMANDS, Context, Invocation
from .account import expiry_warning


def _commands(ctx: Context) -> list[str]:
    """Every command with its forms, as `help` and the welcome list them."""
    prefix = ctx.config.ssh_command("")
    forms = [form for syntax in COMMANDS.values() for form in syntax.forms]
    width = max(len(form) for form in forms)
    lines = [f"Commands ({prefix}COMMAND):"]
    for syntax in COMMANDS.values():
        for i, form in enumerate(syntax.forms):
            lines.append(f"  {form:<{width}}  {syntax.summary if i == 0 else ''}".rstrip())
    lines.append(f"  git clone, fetch, push, archive --remote with {ctx.config.clone_url('APP')}")
    return lines


async def run(ctx: Context, inv: Invocation) -> int:
    ident = ctx.identity
    lines = [
        f'Hi {ident.user_name}! You are authenticated with key "{ident.key_name}" '
        f"({ident.fingerprint})."
    ]
    warning = expiry_warning(ctx)
    if warning:
        lines.append(warning)
    apps = await ctx.store.apps_for(ident.user_id)
    if apps:
        width = max(len(app.name) for app, _ in apps)
        lines.append("Apps you can reach:")
        for app, role in apps:
            lines.append(
                f"  {app.name:<{width}}  {role.label:<5}  {ctx.config.clone_url(app.name)}"
            )
    else:
        lines.append("You cannot reach any app yet: ask an app's owner to grant you access.")
    lines += _commands(ctx)
    lines.append("There is no shell.")
    ctx.channel.stdout.write(("\n".join(lines) + "\n").encode())
    await ctx.channel.stdout.drain()
    return 0


async def help_text(ctx: Context, inv: Invocation) -> int:
    ctx.channel.stdout.write(("\n".join(_commands(ctx)) + "\n").encode())
    await ctx.channel.stdout.drain()
    return 0
