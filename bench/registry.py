"""Many SSH keys for the auth-cost workload: generated once, seeded through the Store, timed."""

from __future__ import annotations

import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.keys import PublicKey, parse_public_key
from gateway.store import open_store

BATCH = 1_000  # keys per user, and per transaction


def generate_keys(count: int) -> list[PublicKey]:
    """`count` real ed25519 public keys, parsed as the registry stores them."""
    keys = []
    for _ in range(count):
        raw = (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
        keys.append(parse_public_key(raw.decode()))
    return keys


async def seed(database: str, prefix: str, keys: list[PublicKey]) -> float:
    """Register `keys` for users `<prefix>0`, `<prefix>1`... (BATCH keys each) through the
    Store interface the CLI and API use, one transaction per user; the seconds it took.

    Both backends get the same calls, so the figures compare them; a transaction per batch
    spares a commit per key, which is what made this slow (a bulk COPY would be faster
    still, but would bypass the Store)."""
    store = await open_store(database)
    try:
        started = time.perf_counter()
        for start in range(0, len(keys), BATCH):
            user = f"{prefix}{start // BATCH}"
            async with store.transaction():
                await store.create_user(user)
                for index in range(start, min(len(keys), start + BATCH)):
                    await store.add_key(user, f"k{index}", keys[index])
        return time.perf_counter() - started
    finally:
        await store.close()


async def count_keys(database: str) -> int:
    """How many keys the registry holds (the figures say how many were measured against)."""
    store = await open_store(database)
    try:
        return sum(summary.keys for summary in await store.list_users())
    finally:
        await store.close()


async def remove_users(database: str, prefix: str) -> float:
    """Remove the users `seed` created with this prefix (their keys go with them); seconds."""
    store = await open_store(database)
    try:
        started = time.perf_counter()
        for summary in await store.list_users():
            name = summary.user.name
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                await store.remove_user(name)
        return time.perf_counter() - started
    finally:
        await store.close()
