"""The command-less session (who the key belongs to, which apps it reaches) and `help`."""

from __future__ import annotations

import textwrap

from ... import times
from ...tables import one_line
from . import COMMANDS, Context, Invocation
from .account import expiry_warning

WIDTH = 80  # a terminal's width: nothing of `help` or the welcome's command list wraps


def _commands(ctx: Context) -> list[str]:
    """Every command with its forms, as `help` and the welcome list them: each form on its
    own line, what it does wrapped under it, nothing wider than WIDTH columns (but a host
    name or URL longer than a line)."""
    prefix = ctx.config.ssh_command("")
    lines = _wrap(f"Commands ({prefix}COMMAND):", "")
    for syntax in COMMANDS.values():
        for form in syntax.forms:
            lines += _wrap(form, "  ")
        lines += _wrap(syntax.summary, "      ")
    lines += _wrap(
        f"git clone, fetch, push, archive --remote with {ctx.config.clone_url('APP')}", "  "
    )
    return lines


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "    ",
        break_long_words=False,
        break_on_hyphens=False,
    )


async def run(ctx: Context, inv: Invocation) -> int:
    ident = ctx.identity
    if ident.deploy:
        access = "read-write" if ident.access == "write" else "read-only"
        lines = [
            f'Hi! You are authenticated with the deploy key "{ident.key_name}" of '
            f"{ident.app_name} ({ident.fingerprint}), {access}: it reaches "
            f"{ctx.config.clone_url(ident.app_name or '')} only."
        ]
    elif ident.certificate is not None:
        cert = ident.certificate
        lines = [
            f"Hi {ident.user_name}! You are authenticated with the certificate "
            f'"{one_line(cert.key_id)}" (serial {cert.serial}, principal '
            f"{one_line(cert.principal)}, valid "
            f"{'until ' + times.text(cert.until) if cert.until else 'forever'}), "
            f"signed by the CA {cert.ca_fingerprint}."
        ]
    else:
        lines = [
            f'Hi {ident.user_name}! You are authenticated with key "{ident.key_name}" '
            f"({ident.fingerprint})."
        ]
    if ctx.refused_keys:
        # A multi-key agent: say which of its keys this is, and that the others are unknown.
        count = len(ctx.refused_keys)
        others = "another key" if count == 1 else f"{count} other keys"
        lines.append(
            f"Your client offered {others} first, not registered here: "
            f"{', '.join(ctx.refused_keys)}."
        )
    warning = expiry_warning(ctx)
    if warning:
        lines.append(warning)
    apps = await ctx.domain.access.reachable(ident)
    if ident.deploy:
        pass  # its one app is named above
    elif apps:
        width = max(len(app.name) for app, _ in apps)
        lines.append("Apps you can reach:")
        for app, role in apps:
            lines.append(
                f"  {app.name:<{width}}  {role.label:<5}  {ctx.config.clone_url(app.name)}"
            )
        if ident.scope is not None or ident.access == "read":
            lines.append(f"This key is limited to: {_limits(ident.scope, ident.access)}.")
    elif ident.scope is not None:
        lines.append(
            f"This key is limited to {_limits(ident.scope, ident.access)}, "
            "where you have no role (any more)."
        )
    else:
        lines.append("You cannot reach any app yet: ask an app's owner to grant you access.")
    lines += _commands(ctx)
    lines.append("There is no shell.")
    ctx.channel.stdout.write(("\n".join(lines) + "\n").encode())
    await ctx.channel.stdout.drain()
    return 0


def _limits(scope: tuple[str, ...] | None, access: str | None) -> str:
    apps = "every app of yours" if scope is None else (", ".join(scope) or "no app")
    return apps + (", reading only" if access == "read" else "")


async def help_text(ctx: Context, inv: Invocation) -> int:
    ctx.channel.stdout.write(("\n".join(_commands(ctx)) + "\n").encode())
    await ctx.channel.stdout.drain()
    return 0
