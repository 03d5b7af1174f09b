"""Edge limits: connection admission (total, per address, unauthenticated) and rate limits."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from .config import LimitSettings


@dataclass
class Admission:
    """Connection counters and the admission decision, taken before the SSH banner.

    Unauthenticated connections are capped on their own (as OpenSSH's MaxStartups) so that
    a flood of half-open logins cannot starve authenticated users; the per-address cap is
    generous because CI fan-out comes from one NAT address.
    """

    settings: LimitSettings
    total: int = 0
    unauthenticated: int = 0
    per_address: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def admit(self, address: str) -> str | None:
        """Count a new connection in, or return why it is refused."""
        limits = self.settings
        if self.total >= limits.max_connections:
            return "max_connections"
        if self.unauthenticated >= limits.max_unauthenticated:
            return "max_unauthenticated"
        if self.per_address[address] >= limits.max_connections_per_address:
            return "max_connections_per_address"
        self.total += 1
        self.unauthenticated += 1
        self.per_address[address] += 1
        return None

    def authenticated(self) -> None:
        self.unauthenticated -= 1

    def release(self, address: str, authenticated: bool) -> None:
        self.total -= 1
        if not authenticated:
            self.unauthenticated -= 1
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]


class RateLimiter:
    """A token bucket per key: `per_minute` operations per minute, bursts up to that many."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[object, tuple[float, float]] = {}

    def take(self, key: object, now: float | None = None) -> float:
        """Take one token; return 0 if allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        capacity = float(self.per_minute)
        rate = capacity / 60.0
        tokens, last = self._buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate
