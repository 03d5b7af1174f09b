"""Times: aware UTC datetimes throughout the code, one text form at its edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


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


_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400}
MAX_LIFETIME_DAYS = 3650  # an expiry further than ten years out is a typo, not a plan


def expiry(value: str, current: datetime) -> datetime:
    """When something given `--expires VALUE` stops working: a duration from now (`12h`,
    `90d`, `4w`), a date (`2027-01-31`: from 00:00 UTC that day) or an ISO 8601 time.
    Raises ValueError, with the line to show, for anything else or a moment not ahead."""
    value = value.strip()
    unit = _UNITS.get(value[-1:].lower())
    moment: datetime | None
    if unit is not None and value[:-1].isascii() and value[:-1].isdigit() and len(value) < 8:
        moment = current + timedelta(seconds=int(value[:-1]) * unit)
    else:
        try:
            moment = parse(value) if len(value) <= 40 else None
        except ValueError:
            moment = None
        if moment is None:
            raise ValueError(
                "an expiry is a duration (12h, 90d, 4w), a date (2027-01-31) or an ISO 8601 time"
            )
    moment = moment.replace(microsecond=0)
    if moment <= current:
        raise ValueError(f"the expiry {text(moment)} is not in the future")
    if moment > current + timedelta(days=MAX_LIFETIME_DAYS):
        raise ValueError(f"the expiry {text(moment)} is more than {MAX_LIFETIME_DAYS} days away")
    return moment
