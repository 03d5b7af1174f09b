"""Connection counts shared by the worker processes of one node, so that `[limits]` caps
on connections (in total, still logging in, per source address, per user) and on a user's
fetches hold for the node.

The counts live in one shared memory file (a memfd the supervisor creates and every worker
inherits). Each worker has a region of its own that only it writes: its totals and a table
of its connections per source address. Deciding a new connection reads every region, under
a lock on the file (fcntl record locks belong to the process, so they exclude the other
workers, and are dropped by the kernel if a worker dies holding one). When a worker dies,
the supervisor clears its region before starting the next one: a crash leaks nothing.

Addresses (and users, in their own digest domains) are stored as keyed BLAKE2b digests (the
key is random per run and lives only in the shared memory), so that no client can choose
addresses whose slots collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import struct
from collections.abc import Iterator

MAGIC = b"ggwadm01"
_HEADER = struct.Struct("<8s16sII")  # magic, hash key, workers, slots per region
_REGION = struct.Struct("<III4x")  # connections, unauthenticated, slots in use
_SLOT = struct.Struct("<16sI")  # address digest (zero: never used), connections
_EMPTY = bytes(16)


class TableFull(Exception):
    """This worker's address table has no free slot (see `capacity`)."""


def capacity(max_connections: int) -> int:
    """Slots per worker region: a worker never holds more addresses than connections, nor
    more users (their connections, their fetches, their pushes) than that; and the table
    is rebuilt before it is three quarters used."""
    return 6 * max_connections + 64


class SharedCounts:
    """One node's connection counts, as seen from one process (a worker writes `region`)."""

    def __init__(self, fd: int, region: int | None = None) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size)
        magic, self._key, self.workers, self.slots = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            raise ValueError("not a git-gateway admission table")
        self._region_size = _REGION.size + self.slots * _SLOT.size
        self.region = region

    @classmethod
    def create(cls, workers: int, max_connections: int) -> SharedCounts:
        """A new, empty table for `workers` processes (in the supervisor)."""
        slots = capacity(max_connections)
        fd = os.memfd_create("git-gateway-admission")
        size = _HEADER.size + workers * (_REGION.size + slots * _SLOT.size)
        os.ftruncate(fd, size)  # a memfd starts zero-filled
        with mmap.mmap(fd, size) as view:
            _HEADER.pack_into(view, 0, MAGIC, secrets.token_bytes(16), workers, slots)
        return cls(fd)

    def close(self) -> None:
        self._map.close()

    # -- locking --

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # -- reading (under the lock) --

    def digest(self, address: str, domain: str = "") -> bytes:
        """The slot key of an address, or of a user's count of one kind (`domain`)."""
        person = domain.encode()[:16]
        return hashlib.blake2b(
            address.encode(), key=self._key, digest_size=16, person=person
        ).digest()

    def _base(self, region: int) -> int:
        return int(_HEADER.size + region * self._region_size)

    def totals(self) -> tuple[int, int]:
        """(connections, unauthenticated) across every worker."""
        total = unauthenticated = 0
        for region in range(self.workers):
            conns, unauth, _ = _REGION.unpack_from(self._map, self._base(region))
            total += conns
            unauthenticated += unauth
        return total, unauthenticated

    def from_address(self, digest: bytes) -> int:
        """Connections from one address (or a user's count, see `digest`) across every
        worker."""
        count = 0
        for region in range(self.workers):
            slot = self._find(region, digest)
            if slot is not None:
                count += _SLOT.unpack_from(self._map, slot)[1]
        return count

    def _slot_offsets(self, region: int, digest: bytes) -> Iterator[int]:
        """Slot offsets in probing order for this digest (linear probing)."""
        first = int.from_bytes(digest[:8], "little") % self.slots
        slots = self._base(region) + _REGION.size
        for i in range(self.slots):
            yield slots + ((first + i) % self.slots) * _SLOT.size

    def _find(self, region: int, digest: bytes) -> int | None:
        for offset in self._slot_offsets(region, digest):
            stored = self._map[offset : offset + 16]
            if stored == digest:
                return offset
            if stored == _EMPTY:
                return None
        return None

    # -- writing this worker's region (under the lock) --

    def _own(self) -> int:
        if self.region is None:
            raise RuntimeError("this process owns no region")
        return self.region

    def adjust(self, connections: int, unauthenticated: int) -> None:
        base = self._base(self._own())
        conns, unauth, used = _REGION.unpack_from(self._map, base)
        _REGION.pack_into(
            self._map, base, max(conns + connections, 0), max(unauth + unauthenticated, 0), used
        )

    def set_address(self, digest: bytes, count: int, live: dict[bytes, int]) -> None:
        """Record this worker's count for one address; `live` is every address it holds
        (with the new count), used to rebuild the table when deleted slots pile up."""
        region = self._own()
        offset = self._find(region, digest)
        if offset is not None:
            _SLOT.pack_into(self._map, offset, digest, count)
            return
        if count == 0:
            return
        base = self._base(region)
        conns, unauth, used = _REGION.unpack_from(self._map, base)
        if (used + 1) * 4 > self.slots * 3:
            self._rebuild(region, live)
            return
        for offset in self._slot_offsets(region, digest):
            stored = self._map[offset : offset + 16]
            if stored == _EMPTY:
                _SLOT.pack_into(self._map, offset, digest, count)
                _REGION.pack_into(self._map, base, conns, unauth, used + 1)
                return
        raise TableFull  # pragma: no cover - the rebuild above keeps a quarter free

    def _rebuild(self, region: int, live: dict[bytes, int]) -> None:
        """Rewrite the region's table with only the addresses still connected (slots of
        addresses whose count went to 0 stay as probe-chain links until then)."""
        entries = {d: c for d, c in live.items() if c > 0}
        if len(entries) * 4 > self.slots * 3:
            raise TableFull
        base = self._base(region)
        conns, unauth, _ = _REGION.unpack_from(self._map, base)
        start = base + _REGION.size
        self._map[start : start + self.slots * _SLOT.size] = bytes(self.slots * _SLOT.size)
        for digest, count in entries.items():
            for offset in self._slot_offsets(region, digest):
                if self._map[offset : offset + 16] == _EMPTY:
                    _SLOT.pack_into(self._map, offset, digest, count)
                    break
        _REGION.pack_into(self._map, base, conns, unauth, len(entries))

    def clear(self, region: int) -> None:
        """Forget everything a (dead or new) worker held."""
        base = self._base(region)
        with self.locked():
            self._map[base : base + self._region_size] = bytes(self._region_size)
