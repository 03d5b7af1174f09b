"""Plain-text tables shared by the operator CLI and the SSH commands."""

from __future__ import annotations

from .models import Deploy

DEPLOY_HEADERS = ["ID", "STATUS", "BRANCH", "COMMIT", "PUSHER", "CREATED", "SUBJECT"]


def render(rows: list[list[str]], headers: list[str]) -> str:
    """Left-aligned columns separated by two spaces, one line per row, headers first."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines) + "\n"


def deploy_rows(deploys: list[Deploy]) -> list[list[str]]:
    return [
        [
            f"#{d.id}",
            d.status.value,
            d.branch,
            d.new_sha[:8],
            d.pusher,
            d.created_at,
            d.subject[:50],
        ]
        for d in deploys
    ]
