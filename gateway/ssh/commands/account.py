"""Self-service over SSH: `whoami`, `keys`, `keys add NAME < KEY.pub`, `keys remove NAME`.

The same domain facade, rules and messages as the operator CLI and the HTTP API; the
account is always the connection's own (bound to the key that completed authentication).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from ... import tables, times
from ...domain.accounts import MAX_KEY_TEXT
from ...errors import GatewayError, UsageError
from ...models import Identity
from .base import Command, Context, Invocation, Usage, no_words

# Seconds `keys add` waits for the public key on standard input (a forgotten `< key.pub`
# leaves ssh waiting on the terminal: it ends with a usage line rather than hanging).
KEY_INPUT_TIMEOUT = 30.0


async def _write(ctx: Context, text: str) -> None:
    ctx.channel.stdout.write(text.encode("utf-8", "replace"))
    await ctx.channel.stdout.drain()


def expiry_warning(ctx: Context) -> str | None:
    """One line when the connection's key expires within WARN_DAYS days, else None."""
    ident = ctx.identity
    if ident.expires_at is None or ident.expires_at - times.now() > timedelta(
        days=tables.WARN_DAYS
    ):
        return None
    when = tables.expiry_text(ident.expires_at, times.now())
    add = ctx.config.ssh_command("keys add NAME < KEY.pub")
    return f'warning: your SSH key "{ident.key_name}" expires {when}: add another: {add}'


def _expiry(ident: Identity) -> datetime | None:
    if ident.certificate is not None:
        return ident.certificate.until
    return ident.expires_at


async def whoami(ctx: Context, inv: Invocation) -> int:
    ident = ctx.identity
    if ident.deploy:
        access = "read-write" if ident.access == "write" else "read-only"
        owner = f"deploy key of {ident.app_name} ({access})"
    else:
        owner = f"user: {ident.user_name}"
    what = f"key: {ident.key_name} ({ident.fingerprint})"
    if ident.certificate is not None:
        cert = ident.certificate
        what = (
            # The key id and principal are the CA's text (often from user claims): escaped.
            f"certificate: {tables.one_line(cert.key_id)} (serial {cert.serial}, principal "
            f"{tables.one_line(cert.principal)}, "
            f"CA {cert.ca_fingerprint}, key {ident.fingerprint})"
        )
    lines = [
        owner,
        what,
        f"expires: {tables.expiry_text(_expiry(ident), times.now())}",
    ]
    warning = expiry_warning(ctx)
    if warning:
        lines.append(warning)
    await _write(ctx, "".join(f"{line}\n" for line in lines))
    return 0


async def _read_key(ctx: Context) -> str:
    """The public key the client sends on stdin, at most MAX_KEY_TEXT characters."""
    chunks: list[bytes] = []
    size = 0

    async def read_all() -> None:
        nonlocal size
        while size <= MAX_KEY_TEXT:
            chunk = await ctx.channel.stdin.read(MAX_KEY_TEXT + 1 - size)
            if not chunk:
                return
            chunks.append(chunk)
            size += len(chunk)

    try:
        await asyncio.wait_for(read_all(), KEY_INPUT_TIMEOUT)
    except TimeoutError:
        raise UsageError(
            "no public key on standard input: ssh ... keys add NAME < ~/.ssh/id_ed25519.pub"
        ) from None
    if size > MAX_KEY_TEXT:
        raise UsageError(f"public key text is too long (limit {MAX_KEY_TEXT} characters)")
    text = b"".join(chunks).decode("utf-8", "replace")
    if not text.strip():
        raise UsageError(
            "no public key on standard input: ssh ... keys add NAME < ~/.ssh/id_ed25519.pub"
        )
    return text


async def keys(ctx: Context, inv: Invocation) -> int:
    if ctx.identity.deploy:
        raise GatewayError(
            f"this is a deploy key of {ctx.identity.app_name}: it manages no keys "
            "(log in with your own key)"
        )
    ident = ctx.identity
    user = ident.user_name
    accounts = ctx.domain.accounts
    action = inv.args[0]
    if action != "list" and (ident.scope is not None or ident.access == "read"):
        # A key limited to some apps or to reading must not mint an unlimited one, nor take
        # the account's other keys away.
        raise GatewayError(
            "this key is limited (to some apps or to reading): it may list the account's keys, "
            "not add or remove them (log in with an unlimited key)"
        )
    if action == "list":
        found = await accounts.list_keys(user)
        rows = [
            [*row, "<- this connection" if key.id == ctx.identity.key_id else ""]
            for row, key in zip(tables.key_rows(found), found, strict=True)
        ]
        await _write(ctx, tables.render(rows, [*tables.KEY_HEADERS, ""]))
        return 0
    name, expires = inv.args[1], inv.args[2]
    if action == "add":
        text = await _read_key(ctx)
        apps = list(inv.args[4:])
        # A key that expires (a certificate too) adds none that outlives it.
        record = await accounts.add_key(
            user,
            name,
            text,
            actor=user,
            expires=expires or None,
            not_after=_expiry(ident),
            read_only=inv.args[3] == "read-only",
            apps=apps or None,
        )
        await _write(ctx, tables.key_added(record))
        return 0
    removed = await accounts.remove_key(user, name, actor=user)
    note = ""
    if removed.id == ctx.identity.key_id:
        note = "This was the key of this connection: it can no longer log in.\n"
    await _write(ctx, tables.key_removed(removed) + note)
    return 0


MAX_KEY_APPS = 100


def _keys(words: list[str]) -> tuple[str, ...]:
    """`keys`, `keys remove NAME`, `keys add NAME [--expires WHEN] [--read-only] [--app APP]...`
    as ("list",), ("remove", NAME, "", ""), ("add", NAME, WHEN, "read-only" or "", APP...).
    Names, expiry and apps are then checked by the registry's rules."""
    if not words or words == ["list"]:
        return ("list",)
    if len(words) == 2 and words[0] == "remove":
        return ("remove", words[1], "", "")
    if len(words) < 2 or words[0] != "add" or words[1].startswith("-"):
        raise Usage
    expires, read_only = "", ""
    apps: list[str] = []
    rest = words[2:]
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=")
        if name in ("--expires", "--app") and not eq:
            if not rest:
                raise Usage
            value = rest.pop(0)
        if name == "--expires" and not expires:
            expires = value
        elif name == "--app" and len(apps) < MAX_KEY_APPS:
            apps.append(value)
        elif word == "--read-only":
            read_only = "read-only"
        else:
            raise Usage
    return ("add", words[1], expires, read_only, *apps)


WHOAMI = Command(
    "whoami", ("whoami",), "your account and the key this connection used", no_words, whoami
)
KEYS = Command(
    "keys",
    (
        "keys",
        "keys add NAME [--expires WHEN] [--read-only] [--app APP]... < KEY.pub",
        "keys remove NAME",
    ),
    "list, add or remove the SSH keys of your account",
    _keys,
    keys,
    rated=True,
)
