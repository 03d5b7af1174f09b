"""Refusals explained only to a client that proves it holds the refused key.

A registered key that may not log in (expired, for now) is refused like an unknown one, so
that the client goes on to its next key. To say *why* (the key's name, its account, when it
expired) without telling a stranger who merely offers someone's public key, the gateway first
asks for a signature: it answers the unsigned probe with "go on" (as for any registered key,
so a probe learns nothing new), and refuses the signed request only after asyncssh has
verified the signature. Only then is the refusal proven, explained and audited.

asyncssh calls its connection's `validate_public_key(username, key_data, msg, signature)`
for every public-key request, then the SSHServer's own `validate_public_key(username, key)`,
and verifies the signature after that; the wrapper below sees the verified outcome. If
asyncssh ever lacks that method, `install` says so and the gateway refuses such keys plainly.
The same wrapper sends certificate requests to the certificate policy (server._certificate,
certs.py) before asyncssh's own certificate check, which only ever sees what it allowed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncssh

from ..models import Identity

log = logging.getLogger("gateway.auth")

# asyncssh's own check of one request: (username, key_data, msg, signature) -> accepted.
Verify = Callable[[str, bytes, bytes, bytes], Awaitable[bool]]
# The certificate path: None for a plain key, else the decision (see server._certificate).
Certificates = Callable[[str, bytes, bytes, bytes, Verify], Awaitable[bool | None]]


@dataclass(frozen=True)
class Refusal:
    """A registered key that may not log in, and why."""

    identity: Identity
    reason: str  # "expired"
    expires_at: datetime | None = None


class Proofs:
    """One connection's refusals: the one waiting for a signature, and those proven."""

    def __init__(
        self,
        on_proven: Callable[[Refusal], Awaitable[None]],
        on_certificate: Certificates | None = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        self.installed = False
        self.pending: Refusal | None = None
        self.proven: list[Refusal] = []
        self._on_proven = on_proven
        self._on_certificate = on_certificate
        self._on_request = on_request

    def install(self, conn: Any) -> bool:
        """Wrap the connection's key check; False (and nothing changed) if it cannot be."""
        original = getattr(conn, "validate_public_key", None)
        if original is None or not inspect.iscoroutinefunction(original):
            return False

        async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            self.pending = None
            if self._on_request is not None:
                self._on_request()
            if self._on_certificate is not None:
                try:
                    decided = await self._on_certificate(
                        username, key_data, msg, signature, original
                    )
                except asyncssh.Error:
                    raise  # a decision to disconnect (too many attempts, registry down)
                except Exception:
                    # A bug in the certificate path fails this attempt, not the connection
                    # (the client's next key may be a plain one).
                    log.exception("event=certificate_check_failed")
                    return False
                if decided is not None:
                    return decided
            accepted = await original(username, key_data, msg, signature)
            refusal, self.pending = self.pending, None
            if refusal is None:
                return bool(accepted)
            if not accepted:
                return False  # a bad signature proves nothing
            if not msg:
                return True  # an unsigned probe: let the client sign, to prove possession
            self.proven.append(refusal)
            try:
                await self._on_proven(refusal)  # explained and audited: a courtesy
            except Exception:
                log.exception("event=refusal_report_failed")
            return False

        conn.validate_public_key = validate
        self.installed = True
        return True

    def ask_for_proof(self, refusal: Refusal) -> bool:
        """What the SSHServer's key check returns for a key it refuses: True (go on to the
        signature) only when the wrapper is there to turn a proven request into a refusal."""
        if not self.installed:
            return False
        self.pending = refusal
        return True
