"""Edge limits: connection admission (total, per address, unauthenticated), what one user
holds at once (connections, fetches) and rate limits."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import LimitSettings, at_use
from ..models import Identity
from ..shared_limits import SharedCounts, TableFull

# What one user holds, counted per node: `Admission.hold` kinds (also the digest domains in
# the shared table, apart from addresses).
CONNECTIONS = "connections"
FETCHES = "fetches"
PUSHES = "pushes"


def user_key(identity: Identity) -> str:
    """What the per-user caps count: the account, or the deploy key (as the rate limit)."""
    if identity.user_id is not None:
        return f"user:{identity.user_id}"
    return f"deploy-key:{identity.key_id}"


@dataclass
class Admission:
    """Connection counters and the admission decision, taken before the SSH banner.

    Unauthenticated connections are capped on their own (as OpenSSH's MaxStartups) so that
    a flood of half-open logins cannot starve authenticated users; the per-address cap is
    generous because CI fan-out comes from one NAT address.
    """

    # The running gateway passes a callable: the caps follow a reload at once.
    settings: LimitSettings | Callable[[], LimitSettings]
    total: int = 0
    unauthenticated: int = 0
    per_address: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # With several worker processes: the node's counts, which the caps apply to (this
    # process's own counts above stay its share of them).
    shared: SharedCounts | None = None
    # Per user: (kind, user_key) -> this process's count (its share of the node's, if shared).
    held: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # The digests this process holds in the shared table: addresses and users alike.
    _digests: dict[bytes, int] = field(default_factory=dict)

    def admit(self, address: str) -> str | None:
        """Count a new connection in, or return why it is refused."""
        if self.shared is not None:
            return self._admit_shared(address, self.shared)
        refused = self._refusal(self.total, self.unauthenticated, self.per_address.get(address, 0))
        if refused is None:
            self._count_in(address)
        return refused

    def _refusal(self, total: int, unauthenticated: int, here: int) -> str | None:
        limits = at_use(self.settings)
        if total >= limits.max_connections:
            return "max_connections"
        if unauthenticated >= limits.max_unauthenticated:
            return "max_unauthenticated"
        if here >= limits.max_connections_per_address:
            return "max_connections_per_address"
        return None

    def _count_in(self, address: str) -> None:
        self.total += 1
        self.unauthenticated += 1
        self.per_address[address] += 1

    def _admit_shared(self, address: str, shared: SharedCounts) -> str | None:
        digest = shared.digest(address)
        with shared.locked():
            total, unauthenticated = shared.totals()
            refused = self._refusal(total, unauthenticated, shared.from_address(digest))
            if refused is not None:
                return refused
            if not self._count_shared(shared, digest):
                return "max_connections"
            shared.adjust(1, 1)
        self._count_in(address)
        return None

    def _count_shared(self, shared: SharedCounts, digest: bytes) -> bool:
        """One more under `digest` in the node's table (held lock); False if it is full."""
        self._digests[digest] = self._digests.get(digest, 0) + 1
        try:
            shared.set_address(digest, self._digests[digest], self._digests)
        except TableFull:  # only after a reload raised max_connections past the table
            self._forget(digest)
            return False
        return True

    def _uncount_shared(self, shared: SharedCounts, digest: bytes) -> None:
        """One less under `digest` in the node's table (held lock)."""
        self._forget(digest)
        shared.set_address(digest, self._digests.get(digest, 0), self._digests)

    def _forget(self, digest: bytes) -> None:
        self._digests[digest] -= 1
        if self._digests[digest] <= 0:
            del self._digests[digest]

    def authenticated(self) -> None:
        self.unauthenticated -= 1
        if self.shared is not None:
            with self.shared.locked():
                self.shared.adjust(0, -1)

    def release(self, address: str, authenticated: bool) -> None:
        self.total -= 1
        if not authenticated:
            self.unauthenticated -= 1
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]
        if self.shared is not None:
            shared = self.shared
            digest = shared.digest(address)
            with shared.locked():
                self._uncount_shared(shared, digest)
                shared.adjust(-1, 0 if authenticated else -1)

    def hold(self, kind: str, key: str, limit: int) -> bool:
        """Count one more `kind` (CONNECTIONS, FETCHES) for a user, unless they already
        hold `limit` of them on the node; the caller gives it back with `give_back`."""
        here = (kind, key)
        if self.shared is not None:
            shared = self.shared
            digest = shared.digest(key, kind)
            with shared.locked():
                if shared.from_address(digest) >= limit or not self._count_shared(shared, digest):
                    return False
        elif self.held.get(here, 0) >= limit:
            return False
        self.held[here] += 1
        return True

    def give_back(self, kind: str, key: str) -> None:
        here = (kind, key)
        self.held[here] -= 1
        if self.held[here] <= 0:
            del self.held[here]
        if self.shared is not None:
            shared = self.shared
            digest = shared.digest(key, kind)
            with shared.locked():
                self._uncount_shared(shared, digest)


class RateLimiter:
    """A token bucket per key: `per_minute` operations per minute, bursts up to that many."""

    def __init__(self, per_minute: int | Callable[[], int], max_keys: int | None = None) -> None:
        self.per_minute = per_minute  # a callable follows the running configuration
        self.max_keys = max_keys  # keys a client may choose (addresses): bounded memory
        self._buckets: dict[object, tuple[float, float]] = {}

    def take(self, key: object, now: float | None = None) -> float:
        """Take one token; return 0 if allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        capacity = float(at_use(self.per_minute))
        rate = capacity / 60.0
        full = self.max_keys is not None and len(self._buckets) >= self.max_keys
        if full and key not in self._buckets:
            # Forget the longest-unused tenth (dicts keep insertion order and a bucket is
            # re-inserted when used): O(1) per key on average, memory bounded. A bucket
            # forgotten early only gives its key a fresh budget.
            for stale in list(itertools.islice(self._buckets, max(1, (self.max_keys or 0) // 10))):
                del self._buckets[stale]
        tokens, last = self._buckets.pop(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate
