"""Plain-text tables and lines shared by the operator CLI and the SSH commands."""

from __future__ import annotations

from datetime import datetime

from . import times
from .keys import KEYGEN_TYPE
from .models import Deploy, SSHKey
from .textsafe import terminal_safe

KEY_HEADERS = [
    "NAME",
    "TYPE",
    "BITS",
    "FINGERPRINT",
    "MD5",
    "CREATED",
    "LAST USED",
    "EXPIRES",
    "REACHES",
]
WARN_DAYS = 7  # how long before its expiry a key is announced as expiring
DEPLOY_HEADERS = ["ID", "STATUS", "BRANCH", "COMMIT", "PUSHER", "CREATED", "SUBJECT", "NOTE"]


def render(rows: list[list[str]], headers: list[str]) -> str:
    """Left-aligned columns separated by two spaces, one line per row, headers first.

    Cells may hold tenant text (commit subjects, authors, audit details): each is made
    terminal-safe, with its newlines and tabs escaped too so that a row stays one line.
    """
    rows = [[one_line(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines) + "\n"


def shown(moment: datetime | None, otherwise: str = "") -> str:
    """A time as tables show it (its one text form)."""
    return otherwise if moment is None else times.text(moment)


def expiry_text(expires_at: datetime | None, now: datetime) -> str:
    """`never`, the time, and whether it has passed or is near."""
    if expires_at is None:
        return "never"
    if expires_at <= now:
        return f"{shown(expires_at)} (expired)"
    left = expires_at - now
    if left.days < WARN_DAYS:
        soon = f"in {left.days} days" if left.days > 1 else "within 2 days"
        return f"{shown(expires_at)} ({soon})"
    return shown(expires_at)


def key_rows(keys: list[SSHKey]) -> list[list[str]]:
    now = times.now()
    return [
        [
            k.name,
            k.algorithm,
            str(k.bits),
            k.fingerprint,
            k.fingerprint_md5,
            shown(k.created_at),
            shown(k.last_used_at, "never"),
            expiry_text(k.expires_at, now),
            k.reach(),
        ]
        for k in keys
    ]


def key_added(key: SSHKey) -> str:
    until = f", expires {shown(key.expires_at)}" if key.expires_at else ""
    limits = ""
    if key.deploy or key.scope is not None or key.access:
        limits = f"; reaches {key.reach()}"
    kind = "deploy key" if key.deploy else "key"
    return (
        f"added {kind} '{key.name}' to {key.owner}: {key.bits} {key.fingerprint} "
        f"({KEYGEN_TYPE[key.algorithm]}){until}{limits}\n"
    )


def key_removed(key: SSHKey) -> str:
    kind = "deploy key" if key.deploy else "key"
    return f"removed {kind} '{key.name}' ({key.fingerprint}) from {key.owner}\n"


def deploy_rows(deploys: list[Deploy]) -> list[list[str]]:
    return [
        [
            f"#{d.id}",
            d.status.value,
            d.branch,
            d.new_sha[:8],
            d.pusher,
            shown(d.created_at),
            d.subject[:50],
            d.note or "",
        ]
        for d in deploys
    ]


def one_line(text: str) -> str:
    """Terminal-safe text on a single line: newlines and tabs are escaped as well."""
    return terminal_safe(text).replace("\n", "\\n").replace("\t", "\\t")
