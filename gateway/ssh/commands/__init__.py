"""The SSH commands: their one table (which drives parsing, `help`, the welcome screen, usage
errors and metric labels), the parser that turns an exec request into one of them or refuses
it, and the two commands that describe the table (the command-less welcome, `help`).

A new command is one module (its readers, its handler and its `Command`) and one line in
COMMANDS below.
"""

from __future__ import annotations

import shlex
import textwrap

from ... import times
from ...errors import UnknownCommand, printable
from ...tables import one_line
from . import account, deploys, git
from .account import expiry_warning
from .base import (
    GIT_SERVICES,
    Command,
    Context,
    Handler,
    Invocation,
    SessionStats,
    Usage,
    no_words,
    repo_path_to_app,
)

__all__ = [
    "COMMANDS",
    "GIT_SERVICES",
    "KNOWN_COMMANDS",
    "Command",
    "Context",
    "Invocation",
    "SessionStats",
    "command_label",
    "execute",
    "parse",
    "repo_path_to_app",
]

MAX_COMMAND_LENGTH = 4096


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


# Every command a session may run besides git's own, in the order `help` lists them.
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "info",
            ("info",),
            "who you are and the apps you reach (also: no command)",
            no_words,
            run,
        ),
        account.WHOAMI,
        account.KEYS,
        deploys.DEPLOYS,
        deploys.LOGS,
        deploys.CANCEL,
        Command("help", ("help",), "this list", no_words, help_text),
    )
}
KNOWN_COMMANDS = (*GIT_SERVICES, *COMMANDS)
HANDLERS: dict[str, Handler] = {
    **{service: git.run for service in GIT_SERVICES},
    **{name: command.run for name, command in COMMANDS.items()},
}


async def execute(ctx: Context, inv: Invocation) -> int:
    return await HANDLERS[inv.command](ctx, inv)


def command_label(command: str | None) -> str:
    """A bounded metric label for a raw SSH command line (never the client's text)."""
    words = (command or "").split()
    if not words:
        return "info"
    if len(words) >= 2 and words[0] == "git" and f"git-{words[1]}" in GIT_SERVICES:
        return f"git-{words[1]}"
    return words[0] if words[0] in KNOWN_COMMANDS else "other"


def parse(command: str | None) -> Invocation:
    """Turn the exec request into an Invocation; no command at all means `info`."""
    if command is None or not command.strip():
        return Invocation("info", ())
    if len(command) > MAX_COMMAND_LENGTH or "\x00" in command:
        raise UnknownCommand("command refused")
    try:
        # POSIX shell-style word splitting only: nothing is ever run by a shell.
        words = shlex.split(command)
    except ValueError:
        raise UnknownCommand("malformed command") from None
    if not words:
        return Invocation("info", ())
    # Git for Windows and some libraries send the two-word form.
    if len(words) >= 2 and words[0] == "git" and f"git-{words[1]}" in GIT_SERVICES:
        words = [f"git-{words[1]}", *words[2:]]
    name = words[0]
    if name in GIT_SERVICES:
        if len(words) != 2:
            raise UnknownCommand(f"usage: {name} '<app>.git'")
        return Invocation(name, (repo_path_to_app(words[1]),))
    syntax = COMMANDS.get(name)
    if syntax is None:
        raise UnknownCommand(
            f"unknown command '{printable(name, 40)}': this server serves git (clone, fetch, "
            f"push, archive --remote) and: {', '.join(COMMANDS)} ('help' describes them)"
        )
    try:
        return Invocation(name, syntax.read(words[1:]))
    except Usage:
        raise UnknownCommand("usage: " + " | ".join(syntax.forms)) from None
