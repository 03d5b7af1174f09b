"""Plain records shared by every layer: users, keys, apps, roles and the verified identity."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime


class Role(enum.IntEnum):
    """Access levels on an app, ordered so that a higher role includes the lower ones."""

    READ = 1
    WRITE = 2
    ADMIN = 3
    OWNER = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        """Parse a grantable role name (owner is not grantable: it is the app's creator)."""
        try:
            role = cls[text.strip().upper()]
        except KeyError:
            role = None
        if role is None or role is cls.OWNER:
            raise ValueError(f"invalid role '{text}': expected read, write or admin")
        return role


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SSHKey:
    """A registered public key: a user's (user_id), or an app's deploy key (app_id)."""

    id: int
    user_id: int | None
    user_name: str | None
    name: str
    algorithm: str
    bits: int
    public_key: str
    comment: str
    fingerprint: str
    fingerprint_md5: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None = None  # it no longer logs in from then on
    app_id: int | None = None  # a deploy key's app
    app_name: str | None = None
    # "read" or "write" for a deploy key; for a user key "read" (read-only) or None (its roles).
    access: str | None = None
    scope: tuple[str, ...] | None = None  # a user key limited to these apps; None: all

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @property
    def deploy(self) -> bool:
        return self.app_id is not None

    @property
    def owner(self) -> str:
        """Whose key it is, as messages say it."""
        return self.user_name if self.user_name is not None else f"app {self.app_name}"

    def reach(self) -> str:
        """What the key may do, in a few words (lists, the welcome)."""
        if self.deploy:
            return f"{self.app_name} ({'read-write' if self.access == 'write' else 'read-only'})"
        apps = "all your apps" if self.scope is None else (", ".join(self.scope) or "no app")
        return f"{apps}{' (read-only)' if self.access == 'read' else ''}"


@dataclass(frozen=True, slots=True)
class App:
    id: int
    name: str
    owner_id: int
    owner_name: str
    deploy_branch: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Member:
    user_name: str
    role: Role
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CertInfo:
    """An SSH user certificate a connection logged in with, as records and re-checks keep it."""

    key_id: str
    serial: int
    ca_fingerprint: str
    key_fingerprint: str
    valid_before: float  # seconds since the epoch; 2**64 - 1: forever
    principal: str

    @property
    def until(self) -> datetime | None:
        """When it stops being valid, or None for a certificate valid forever."""
        if self.valid_before >= 2**63:
            return None
        return datetime.fromtimestamp(self.valid_before, UTC)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the other end of a connection, bound to the key that completed auth."""

    user_id: int | None  # None for a deploy key
    user_name: str  # the account; for a deploy key `deploy:APP/NAME` (audit, pusher)
    key_id: int
    key_name: str
    fingerprint: str
    expires_at: datetime | None = None
    app_id: int | None = None  # a deploy key's one app
    app_name: str | None = None
    access: str | None = None  # "read" / "write" (deploy key); "read" limits a user key
    scope: tuple[str, ...] | None = None  # a user key limited to these apps
    certificate: CertInfo | None = None  # logged in with a certificate (key_id is then 0)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @property
    def deploy(self) -> bool:
        return self.app_id is not None

    @property
    def rate_key(self) -> object:
        """What the per-user operation rate counts: the account, or the deploy key."""
        return self.user_id if self.user_id is not None else ("deploy", self.key_id)


class DeployStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self not in (DeployStatus.QUEUED, DeployStatus.RUNNING)

    @property
    def ok(self) -> bool:
        return self is DeployStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class Deploy:
    id: int
    app_id: int
    app_name: str
    ref: str
    old_sha: str
    new_sha: str
    pusher: str
    key_fingerprint: str
    subject: str
    author: str
    mode: str
    pipeline: str
    status: DeployStatus
    superseded_by: int | None
    exit_code: int | None
    reason: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    runner: str | None = None  # the gateway process (node) running it
    duration_ms: int | None = None  # measured by the runner, set when it ends
    note: str | None = None  # the pusher's `-o deploy.note=...`

    @property
    def branch(self) -> str:
        return self.ref.removeprefix("refs/heads/")

    @property
    def elapsed(self) -> float | None:
        """Seconds it ran, as the runner measured them (None if it never started)."""
        return None if self.duration_ms is None else self.duration_ms / 1000


@dataclass(frozen=True, slots=True)
class NewDeploy:
    """What a push provides to create a deploy record."""

    app_id: int
    ref: str
    old_sha: str
    new_sha: str
    pusher: str
    key_fingerprint: str
    subject: str
    author: str
    mode: str
    pipeline: str
    note: str | None = None


@dataclass(frozen=True, slots=True)
class LogChunk:
    """A piece of a deploy's output: `position` is where it starts in the whole output
    (bytes, UTF-8), so a gap before it is output that was cut."""

    seq: int
    position: int
    size: int
    closing: bool  # the final line the runner adds; watchers print their own
    text: str

    @property
    def end(self) -> int:
        return self.position + self.size


@dataclass(frozen=True, slots=True)
class Node:
    """One gateway process sharing the registry, as the others see it."""

    id: str
    name: str
    pid: int
    started_at: datetime
    seen_at: float
    # Where the other nodes reach its internal listener ([cluster] listen), if it has one.
    address: str | None = None


@dataclass(frozen=True, slots=True)
class Home:
    """The node serving an app's repository: its process's row, its name (the workers of
    one machine share its filesystem cache) and where the others forward to."""

    node: str
    name: str
    address: str | None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    deploy_id: int
    attempt: int
    url: str
    status_code: int | None
    error: str
    duration_ms: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event: str
    actor: str = ""
    fingerprint: str = ""
    source: str = ""
    app: str = ""
    detail: str = "{}"  # JSON object
    at: datetime | None = None  # set when recorded
    id: int = 0


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A bearer token for the HTTP API: an operator's (user_name None) or a user's own."""

    id: int
    name: str
    user_id: int | None
    user_name: str | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @property
    def personal(self) -> bool:
        return self.user_id is not None
