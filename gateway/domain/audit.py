"""The audit trail: each security-relevant event becomes a registry row and a log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import StoreUnavailable
from ..logs import q
from ..models import AuditEvent
from ..store import AuditTrail, utcnow

log = logging.getLogger("gateway.audit")


async def record(
    store: AuditTrail,
    event: str,
    *,
    actor: str = "",
    fingerprint: str = "",
    source: str = "",
    app: str = "",
    at: datetime | None = None,
    more: Mapping[str, object] | None = None,
    **detail: object,
) -> None:
    """Record an event; a failing write is logged, never raised (auditing must not turn a
    successful operation into a failed one). `more` is detail built elsewhere (a dict of
    optional fields): with ** it could collide with the named fields."""
    detail = {**detail, **(more or {})}
    entry = AuditEvent(
        event=event,
        actor=actor,
        fingerprint=fingerprint,
        source=source,
        app=app,
        detail=json.dumps(detail, sort_keys=True, default=str),
        at=at or utcnow(),
    )
    fields = " ".join(f"{k}={q(v)}" for k, v in detail.items())
    log.info(
        "event=audit kind=%s actor=%s fp=%s source=%s app=%s %s",
        event,
        q(actor or "-"),
        fingerprint or "-",
        source or "-",
        app or "-",
        fields,
    )
    try:
        await store.add_audit(entry)
    except StoreUnavailable as exc:  # a database outage: the log line above keeps the event
        log.error("event=audit_write_failed kind=%s reason=%s", event, q(exc))
    except Exception:
        log.exception("event=audit_write_failed kind=%s", event)


# Failed logins are aggregated: a scan or a flood from many addresses must cost neither a
# registry write per TCP connect nor unbounded memory.
MAX_FAILURE_BUCKETS = 1000
OTHER_SOURCES = "(other sources)"
MAX_FINGERPRINTS = 5


def minute_of(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%MZ")


@dataclass
class FailureBucket:
    reason: str  # the first failure's wording, e.g. "unknown key"
    count: int = 0
    attempts: int = 0  # keys offered, over all these connections
    fingerprints: list[str] = field(default_factory=list)
    last: datetime | None = None


class AuthFailures:
    """Unauthenticated connection failures, counted per (source address, minute, kind) and
    written as one `auth_failed` audit row per bucket with its count.

    Buckets of a finished minute are written by `flush` (the server calls it each minute
    and at shutdown). At most `max_buckets` addresses are tracked per flush period; the
    rest of a scan is counted in one bucket whose source is "(other sources)".
    """

    def __init__(self, store: AuditTrail, max_buckets: int = MAX_FAILURE_BUCKETS) -> None:
        self.store = store
        self.max_buckets = max_buckets
        self.buckets: dict[tuple[str, str, str], FailureBucket] = {}

    def add(
        self,
        source: str,
        kind: str,
        reason: str,
        fingerprint: str = "",
        attempts: int = 0,
        now: datetime | None = None,
    ) -> None:
        now = now or datetime.now(UTC)
        minute = minute_of(now)
        key = (source, minute, kind)
        if key not in self.buckets and len(self.buckets) >= self.max_buckets:
            key = (OTHER_SOURCES, minute, kind)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = FailureBucket(reason)
        bucket.count += 1
        bucket.attempts += attempts
        bucket.last = now.replace(microsecond=0)
        known = bucket.fingerprints
        if fingerprint and fingerprint not in known and len(known) < MAX_FINGERPRINTS:
            known.append(fingerprint)

    async def flush(self, now: datetime | None = None, everything: bool = False) -> int:
        """Write the buckets of minutes before `now`'s (all of them with `everything`);
        return how many rows were written."""
        current = minute_of(now or datetime.now(UTC))
        done = [k for k in self.buckets if everything or k[1] < current]
        for key in done:
            source, minute, kind = key
            bucket = self.buckets.pop(key)
            await record(
                self.store,
                "auth_failed",
                fingerprint=bucket.fingerprints[0] if len(bucket.fingerprints) == 1 else "",
                source=source,
                at=bucket.last,
                reason=bucket.reason,
                kind=kind,
                count=bucket.count,
                attempts=bucket.attempts,
                minute=minute,
                fingerprints=bucket.fingerprints,
            )
        return len(done)
