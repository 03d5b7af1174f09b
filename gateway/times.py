"""Times: aware UTC datetimes throughout the code, one text form at its edges."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    """This moment, to the second (the precision the registry keeps)."""
    return datetime.now(UTC).replace(microsecond=0)


def text(moment: datetime) -> str:
    """The one text form: ISO 8601 in UTC, to the second ("2026-01-01T00:00:00Z")."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(value: str) -> datetime:
    """Read an ISO 8601 time; one without a zone is taken as UTC."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def maybe(value: str | None) -> datetime | None:
    return None if value is None else parse(value)
