"""The audit trail: each security-relevant event becomes a registry row and a log line."""

from __future__ import annotations

import json
import logging

from .logs import q
from .models import AuditEvent
from .store import Store, utcnow

log = logging.getLogger("gateway.audit")


async def record(
    store: Store,
    event: str,
    *,
    actor: str = "",
    fingerprint: str = "",
    source: str = "",
    app: str = "",
    **detail: object,
) -> None:
    """Record an event; a failing write is logged, never raised (auditing must not turn a
    successful operation into a failed one)."""
    entry = AuditEvent(
        event=event,
        actor=actor,
        fingerprint=fingerprint,
        source=source,
        app=app,
        detail=json.dumps(detail, sort_keys=True, default=str),
        at=utcnow(),
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
    except Exception:
        log.exception("event=audit_write_failed kind=%s", event)
