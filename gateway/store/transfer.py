"""`git-gateway db copy`: a SQLite registry into an empty PostgreSQL one, checksummed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..dburl import redact
from ..errors import GatewayError

# Every registry table with the columns both backends share, parents before children, and
# which of them are times (text on SQLite, timestamptz on PostgreSQL).
TABLES: tuple[tuple[str, tuple[str, ...], frozenset[str]], ...] = (
    ("users", ("id", "name", "created_at"), frozenset({"created_at"})),
    ("nodes", ("id", "name", "pid", "started_at", "seen_at", "address"), frozenset({"started_at"})),
    (
        "apps",
        ("id", "name", "owner_id", "deploy_branch", "created_at"),
        frozenset({"created_at"}),
    ),
    (
        "ssh_keys",
        (
            "id",
            "user_id",
            "name",
            "algorithm",
            "bits",
            "public_key",
            "comment",
            "fingerprint",
            "fingerprint_md5",
            "created_at",
            "last_used_at",
            "expires_at",
            "app_id",
            "access",
            "scoped",
        ),
        frozenset({"created_at", "last_used_at", "expires_at"}),
    ),
    ("key_apps", ("key_id", "app_id"), frozenset()),
    ("app_members", ("app_id", "user_id", "role", "created_at"), frozenset({"created_at"})),
    ("app_homes", ("app_id", "node", "claimed_at"), frozenset({"claimed_at"})),
    (
        "deploys",
        (
            "id",
            "app_id",
            "ref",
            "old_sha",
            "new_sha",
            "pusher",
            "key_fingerprint",
            "subject",
            "author",
            "mode",
            "pipeline",
            "status",
            "superseded_by",
            "exit_code",
            "reason",
            "status_token_hash",
            "created_at",
            "started_at",
            "finished_at",
            "runner",
            "origin",
            "cancel_request",
            "report_status",
            "report_exit_code",
            "duration_ms",
            "log_seq",
            "log_bytes",
            "note",
        ),
        frozenset({"created_at", "started_at", "finished_at"}),
    ),
    (
        "deploy_log_chunks",
        ("deploy_id", "seq", "position", "size", "closing", "text"),
        frozenset(),
    ),
    (
        "webhook_deliveries",
        (
            "id",
            "deploy_id",
            "attempt",
            "url",
            "status_code",
            "error",
            "duration_ms",
            "created_at",
        ),
        frozenset({"created_at"}),
    ),
    (
        "audit_events",
        ("id", "at", "event", "actor", "fingerprint", "source", "app", "detail"),
        frozenset({"at"}),
    ),
    (
        "api_tokens",
        ("id", "name", "user_id", "token_hash", "created_at", "last_used_at", "expires_at"),
        frozenset({"created_at", "last_used_at", "expires_at"}),
    ),
    (
        "web_sessions",
        ("id", "id_hash", "token_id", "created_at", "expires_at", "last_seen_at"),
        frozenset({"created_at", "expires_at", "last_seen_at"}),
    ),
)
COLUMNS = tuple((table, columns) for table, columns, _ in TABLES)

Rows = dict[str, list[tuple[Any, ...]]]


@dataclass(frozen=True)
class Side:
    """One registry as the copy saw it: rows per table, id marks and the checksum."""

    rows: dict[str, int]
    marks: dict[str, int]
    checksum: str


@dataclass(frozen=True)
class CopyReport:
    source: Side
    target: Side


class CopyFailed(GatewayError):
    """The copy was refused or rolled back; the target is left as it was."""

    code = "copy_failed"


def _time(value: Any) -> Any:
    from .postgres import from_time, to_time

    if value is None:
        return None
    try:
        return from_time(to_time(value))
    except (TypeError, ValueError):
        return value  # shown as is: the copy itself refuses it with the row named


def checksum(rows: Rows, marks: dict[str, int]) -> str:
    """SHA-256 of a canonical dump: each table in order, rows in key order as JSON arrays,
    times as UTC second-precision strings, then each table's id high-water mark. Both
    sides are dumped the same way, so equal sums mean equal registries."""
    digest = hashlib.sha256()
    for table, columns, times in TABLES:
        positions = [i for i, c in enumerate(columns) if c in times]
        canonical = []
        for row in rows.get(table, []):
            values = list(row)
            for i in positions:
                values[i] = _time(values[i])
            canonical.append(values)
        canonical.sort(key=lambda r: (r[0], r[1]))
        for values in canonical:
            line = json.dumps([table, *values], ensure_ascii=False, separators=(",", ":"))
            digest.update(line.encode() + b"\n")
        if columns[0] == "id":
            digest.update(json.dumps(["next", table, marks.get(table, 0)]).encode() + b"\n")
    return digest.hexdigest()


def _side(rows: Rows, marks: dict[str, int]) -> Side:
    return Side({t: len(r) for t, r in rows.items()}, dict(marks), checksum(rows, marks))


async def copy_registry(source: Any, target: Any) -> CopyReport:
    """Copy every row of `source` (a SQLiteStore) into `target` (an empty PostgresStore),
    ids and id sequences kept, in one transaction that rolls back unless the target then
    holds exactly what the source did (same checksum)."""
    import asyncpg  # type: ignore[import-untyped]

    rows, marks = await source.snapshot(COLUMNS)
    before = _side(rows, marks)
    after: list[Side] = []

    def verify(copied: Rows, copied_marks: dict[str, int]) -> None:
        side = _side(copied, copied_marks)
        after.append(side)
        if side.checksum != before.checksum or side.rows != before.rows:
            raise CopyFailed(
                "the copy differs from the source (checksums "
                f"{before.checksum[:12]} and {side.checksum[:12]}): rolled back"
            )

    try:
        await target.load(TABLES, rows, marks, verify)
    except ValueError as exc:
        raise CopyFailed(f"cannot copy: {exc}; nothing was written") from None
    except asyncpg.DataError as exc:  # e.g. a NUL byte an earlier version stored
        raise CopyFailed(
            f"the source registry holds a value PostgreSQL refuses ({exc}): "
            f"nothing was written to {redact(target.url)}"
        ) from None
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise CopyFailed(
            f"the source registry breaks a constraint ({exc.constraint_name or exc}): "
            f"nothing was written to {redact(target.url)}"
        ) from None
    return CopyReport(before, after[0])


def report_rows(report: CopyReport) -> Sequence[list[str]]:
    return [
        [
            table,
            str(report.source.rows[table]),
            str(report.target.rows[table]),
            str(report.target.marks.get(table, "-")),
        ]
        for table, _, _ in TABLES
    ]
