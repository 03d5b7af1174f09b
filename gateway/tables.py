"""Plain-text tables and lines shared by the operator CLI and the SSH commands."""

from __future__ import annotations

from datetime import datetime

from . import times
from .keys import KEYGEN_TYPE
from .models import Deploy, SSHKey
from .textsafe import terminal_safe

KEY_HEADERS = ["NAME", "TYPE", "BITS", "FINGERPRINT", "MD5", "CREATED", "LAST USED"]
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


def key_rows(keys: list[SSHKey]) -> list[list[str]]:
    return [
        [
            k.name,
            k.algorithm,
            str(k.bits),
            k.fingerprint,
            k.fingerprint_md5,
            shown(k.created_at),
            shown(k.last_used_at, "never"),
        ]
        for k in keys
    ]


def key_added(key: SSHKey) -> str:
    return (
        f"added key '{key.name}' to {key.user_name}: {key.bits} {key.fingerprint} "
        f"({KEYGEN_TYPE[key.algorithm]})\n"
    )


def key_removed(key: SSHKey) -> str:
    return f"removed key '{key.name}' ({key.fingerprint}) from {key.user_name}\n"


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
