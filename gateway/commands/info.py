"""The command-less session: say who the key belongs to and which apps it reaches."""

from __future__ import annotations

from . import Context, Invocation


async def run(ctx: Context, inv: Invocation) -> int:
    ident = ctx.identity
    lines = [
        f'Hi {ident.user_name}! You are authenticated with key "{ident.key_name}" '
        f"({ident.fingerprint})."
    ]
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
    lines.append(
        "This server only serves git (clone, fetch, push, archive --remote); there is no shell."
    )
    ctx.channel.stdout.write(("\n".join(lines) + "\n").encode())
    await ctx.channel.stdout.drain()
    return 0
