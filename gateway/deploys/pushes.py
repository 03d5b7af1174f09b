"""Push sessions: what the hooks of one receive-pack may ask of the gateway, and the proof
that what they report happened.

A hook is trusted for nothing. Its request must come from a process of the gateway's own user
whose parent is the receive-pack the session was opened for (SO_PEERCRED, then /proc), carry
that push's token, and each hook may speak once. The ref updates it lists are then checked
against the repository: before the push for pre-receive (the refs have not moved), after it
for post-receive (each ref holds the new value, and held the old one when the push began or
its reflog records exactly that move). Only verified updates are audited and deployed.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dulwich.reflog import parse_reflog_line
from dulwich.repo import Repo

from .. import names
from ..models import App, Identity
from .options import PushOptions

HOOKS = ("pre-receive", "post-receive")

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
MAX_REF = 1024


class HookRefused(Exception):
    """A hook request the gateway does not believe; the reason goes to the operator's log."""


def is_zero(sha: str) -> bool:
    return set(sha) == {"0"}


@dataclass(frozen=True)
class RefUpdate:
    old: str
    new: str
    ref: str


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass
class PushSession:
    """One receive-pack run: who pushes what, as the gateway verified it (hooks only
    present the session's token; they cannot claim an identity)."""

    token: str
    identity: Identity
    app: App
    conn_id: str
    peer: str
    refs_before: dict[str, str]
    pid: int | None = None  # receive-pack's, once spawned
    spoken: set[str] = field(default_factory=set)  # hooks that have made their request
    detached: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False  # an attached deploy of this push did not succeed
    options: PushOptions | None = None  # `git push -o`, as pre-receive accepted them


class PushSessions:
    def __init__(self) -> None:
        self._by_token: dict[str, PushSession] = {}

    def open(
        self, identity: Identity, app: App, conn_id: str, peer: str, refs_before: dict[str, str]
    ) -> PushSession:
        session = PushSession(secrets.token_urlsafe(32), identity, app, conn_id, peer, refs_before)
        self._by_token[session.token] = session
        return session

    def bind(self, session: PushSession, pid: int) -> None:
        """Tie the session to the receive-pack process that runs it."""
        session.pid = pid

    def close(self, session: PushSession) -> None:
        self._by_token.pop(session.token, None)

    def __len__(self) -> int:
        return len(self._by_token)

    def claim(self, token: Any, hook: Any, peer: Peer | None) -> PushSession:
        """The session a hook request belongs to, or HookRefused with why."""
        if hook not in HOOKS:
            raise HookRefused("unknown_hook")
        session = self._find(token)
        if session is None:
            raise HookRefused("unknown_token")
        if peer is None or peer.uid != os.geteuid():
            raise HookRefused("foreign_peer")
        if session.pid is None or parent_pid(peer.pid) != session.pid:
            raise HookRefused("not_a_hook_of_this_push")
        if hook in session.spoken:
            raise HookRefused("hook_replayed")
        session.spoken.add(hook)
        return session

    def _find(self, token: Any) -> PushSession | None:
        if not isinstance(token, str) or not token:
            return None
        found = None
        # Compared in constant time against every open session: a hook-sized secret must not
        # be guessable from timing, and there are few sessions open at once.
        for candidate, session in self._by_token.items():
            if hmac.compare_digest(candidate.encode(), token.encode("utf-8", "replace")):
                found = session
        return found


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def parse_updates(raw: Any) -> list[RefUpdate]:
    if not isinstance(raw, list) or len(raw) > 100_000:
        raise HookRefused("malformed_updates")
    updates = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(p, str) for p in item)
        ):
            raise HookRefused("malformed_updates")
        old, new, ref = item
        if not _SHA.fullmatch(old) or not _SHA.fullmatch(new) or not _valid_ref(ref):
            raise HookRefused("malformed_updates")
        updates.append(RefUpdate(old, new, ref))
    return updates


def _valid_ref(ref: str) -> bool:
    """Any ref git itself accepts (names with commas or non-ASCII letters are valid
    branches); what an update did is then proven against the repository."""
    return ref.startswith("refs/") and len(ref) <= MAX_REF and names.ref_problem(ref) is None


# -- the repository's word against the hook's (blocking: run on the executor) --


def read_refs(repo_path: Path) -> dict[str, str]:
    """Every ref of the repository and the object it points to (symbolic refs resolved)."""
    repo = Repo(str(repo_path))
    try:
        return {
            ref.decode("utf-8", "surrogateescape"): sha.decode()
            for ref, sha in repo.refs.as_dict().items()
            if ref != b"HEAD"
        }
    finally:
        repo.close()


# A reflog line of a push is ~150 bytes; the tail read for the last one is bounded.
REFLOG_TAIL = 64 * 1024


def _last_reflog_entry(repo_path: Path, ref: str) -> tuple[str, str] | None:
    """The last move the ref's reflog records. Only its tail is read: a ref's reflog grows by
    a line a push for ever (review 2: reading it whole held every entry, ~500 bytes each, in
    the gateway: a tenant's ref pushed 600 times a minute grows ~850000 lines a day)."""
    path = repo_path / "logs" / ref
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - REFLOG_TAIL))
            tail = handle.read(REFLOG_TAIL)
        lines = tail.rstrip(b"\n").split(b"\n")
        if not lines[-1] or (len(lines) == 1 and size > REFLOG_TAIL):
            return None  # empty, or a last line longer than the tail: not a push's
        last = parse_reflog_line(lines[-1])
    except (OSError, ValueError):
        return None
    return last.old_sha.decode(), last.new_sha.decode()


def verify_before(repo_path: Path, updates: list[RefUpdate]) -> None:
    """pre-receive: no ref has moved yet, so each must still hold its old value."""
    now = read_refs(repo_path)
    for update in updates:
        current = now.get(update.ref)
        if (current or "0" * len(update.old)) != update.old:
            raise HookRefused(f"ref_mismatch ref={update.ref}")


def verify_after(
    repo_path: Path, updates: list[RefUpdate], before: dict[str, str]
) -> list[RefUpdate]:
    """post-receive: each ref holds its new value now and held its old value when the push
    began (or its reflog records exactly that move: someone else's push in between)."""
    now = read_refs(repo_path)
    for update in updates:
        current = now.get(update.ref)
        if (current or "0" * len(update.new)) != update.new:
            raise HookRefused(f"ref_mismatch ref={update.ref}")
        previous = before.get(update.ref) or "0" * len(update.old)
        if previous == update.old:
            continue
        if is_zero(update.new) or _last_reflog_entry(repo_path, update.ref) != (
            update.old,
            update.new,
        ):
            raise HookRefused(f"ref_mismatch ref={update.ref}")
    return updates
