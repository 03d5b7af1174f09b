"""Plain-text tables shared by the operator CLI and the SSH commands."""

from __future__ import annotations

from datetime import datetime

from . import times
from .models import Deploy
from .textsafe import terminal_safe

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
