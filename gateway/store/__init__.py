"""The registry interface every caller uses, one part per aggregate (UsersAndKeys,
AppsAndMembers, DeployRecords, DeployQueue, RepositoryHomes, AuditTrail, AccessTokens,
Lifecycle: Store is all of them).

Implementations, each a facade composing one part per aggregate (mixins: each part holds one
aggregate's code, the facade class only puts them together):
- `sql/`: the SQL, written once for every engine (`sql.SQLStore`, its `Dialect` spells what
  engines differ in); `sqlite.py` and `postgres/` are its drivers (connections,
  transactions, migrations, and what only one engine does: LISTEN/NOTIFY, advisory locks,
  id sequences, `db copy`);
- `memory/`: the registry in memory, no SQL, for unit tests (the same contract suite).
Rows become records by column name (`rows.py`)."""

from __future__ import annotations

import abc
import importlib.resources
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from .. import times
from ..dburl import is_postgres
from ..errors import Conflict, KeyInUse, NotFound
from ..keys import PublicKey
from ..models import (
    ApiToken,
    App,
    AuditEvent,
    Deploy,
    DeployStatus,
    Home,
    LogChunk,
    Member,
    NewDeploy,
    Node,
    Role,
    SSHKey,
    User,
    WebhookDelivery,
)

_MIGRATION_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


def packaged_migrations(package: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration a backend package ships, in order."""
    found = []
    for entry in importlib.resources.files(package).joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def utcnow() -> datetime:
    """This moment, aware and in UTC, to the second (what the registry keeps)."""
    return times.now()


@dataclass(frozen=True, slots=True)
class KeyOwner:
    """Whose new key it is, for the backends: a user's (`user_id`) or an app's deploy key
    (`app_id`); the refusals both backends give, in the owner's words."""

    column: str  # "user_id" or "app_id": a column of ssh_keys
    id: int
    name: str

    def __post_init__(self) -> None:
        # The column is put into SQL: only these two, ever.
        if self.column not in ("user_id", "app_id"):
            raise ValueError(self.column)

    @property
    def deploy(self) -> bool:
        return self.column == "app_id"

    def refuse(self, existing: SSHKey) -> NoReturn:
        """The key is registered already: KeyInUse if someone else's, else where it is."""
        if getattr(existing, self.column) != self.id:
            raise KeyInUse()
        where = (
            f"a deploy key of app '{self.name}'"
            if self.deploy
            else f"registered on account '{self.name}'"
        )
        raise Conflict(f"this SSH key is already {where} under the name '{existing.name}'")

    def missing(self, key_name: str) -> NotFound:
        if self.deploy:
            return NotFound(f"app '{self.name}' has no deploy key named '{key_name}'")
        return NotFound(f"user '{self.name}' has no key named '{key_name}'")

    def name_taken(self, key_name: str) -> Conflict:
        return key_name_taken(self.deploy, self.name, key_name)


def key_name_taken(deploy: bool, owner: str, key_name: str) -> Conflict:
    if deploy:
        return Conflict(f"app '{owner}' already has a deploy key named '{key_name}'")
    return Conflict(f"user '{owner}' already has a key named '{key_name}'")


@dataclass(frozen=True, slots=True)
class UserSummary:
    user: User
    keys: int
    apps: int


@dataclass(frozen=True, slots=True)
class WebSession:
    """A keys page sign-in: the personal token it acts with, and its times."""

    id: int
    token: ApiToken
    created_at: datetime
    expires_at: datetime
    last_seen_at: datetime


class UsersAndKeys(abc.ABC):
    """Accounts and their SSH keys (one key, one account)."""

    # -- users --
    @abc.abstractmethod
    async def create_user(self, name: str) -> User: ...

    @abc.abstractmethod
    async def get_user(self, name: str) -> User:
        """Raise NotFound if there is no such user."""

    @abc.abstractmethod
    async def list_users(self) -> list[UserSummary]: ...

    @abc.abstractmethod
    async def remove_user(self, name: str) -> User:
        """Remove a user with their keys and memberships; refused while they own apps."""

    # -- keys --
    @abc.abstractmethod
    async def add_key(
        self,
        user_name: str,
        key_name: str,
        key: PublicKey,
        expires_at: datetime | None = None,
        *,
        access: str | None = None,
        scope: list[str] | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        """Register a user's key; KeyInUse if another account (or app) has it, Conflict if
        this one does, KeyLimitReached if the user has `limit` keys (counted under a lock on
        the user, so concurrent adds cannot pass it). `access="read"` limits the key to
        reading; `scope` to these apps."""

    @abc.abstractmethod
    async def add_deploy_key(
        self,
        app_name: str,
        key_name: str,
        key: PublicKey,
        access: str,
        expires_at: datetime | None = None,
        limit: int | None = None,
    ) -> SSHKey:
        """Register an app's deploy key ("read" or "write"); the same one-owner rule and the
        same `limit`, per app."""

    @abc.abstractmethod
    async def list_deploy_keys(self, app_name: str) -> list[SSHKey]: ...

    @abc.abstractmethod
    async def remove_deploy_key(self, app_name: str, key_name: str) -> SSHKey: ...

    @abc.abstractmethod
    async def list_keys(self, user_name: str) -> list[SSHKey]: ...

    @abc.abstractmethod
    async def remove_key(self, user_name: str, key_name: str) -> SSHKey: ...

    @abc.abstractmethod
    async def find_key(self, fingerprint: str) -> SSHKey | None:
        """The key with this SHA256 fingerprint (the authentication lookup)."""

    @abc.abstractmethod
    async def touch_key(self, key_id: int, when: datetime) -> None:
        """Record a successful use of the key."""


class AppsAndMembers(abc.ABC):
    """Apps, their owners and members' roles."""

    # -- apps --
    @abc.abstractmethod
    async def create_app(self, name: str, owner_name: str, deploy_branch: str) -> App: ...

    @abc.abstractmethod
    async def get_app(self, name: str) -> App | None: ...

    @abc.abstractmethod
    async def list_apps(self) -> list[App]: ...

    @abc.abstractmethod
    async def remove_app(self, name: str) -> App: ...

    @abc.abstractmethod
    async def grant(self, app_name: str, user_name: str, role: Role) -> Role | None:
        """Give a user a role on an app (replacing any previous one); return the previous role."""

    @abc.abstractmethod
    async def revoke(self, app_name: str, user_name: str) -> Role:
        """Remove a member; return the role they had."""

    @abc.abstractmethod
    async def list_members(self, app_name: str) -> list[Member]: ...

    @abc.abstractmethod
    async def role_on(self, app_id: int, user_id: int) -> Role | None:
        """The user's role on the app: OWNER for its owner, None without access."""

    @abc.abstractmethod
    async def apps_for(self, user_id: int) -> list[tuple[App, Role]]:
        """Every app the user can reach, with their role."""


class DeployRecords(abc.ABC):
    """Deploy records, their webhook deliveries and their retention."""

    # -- deploys --
    @abc.abstractmethod
    async def create_deploy(self, new: NewDeploy) -> Deploy:
        """Record a queued deploy."""

    @abc.abstractmethod
    async def get_deploy(self, deploy_id: int) -> Deploy | None: ...

    @abc.abstractmethod
    async def list_deploys(self, app_name: str, limit: int = 20) -> list[Deploy]:
        """The app's most recent deploys, newest first."""

    @abc.abstractmethod
    async def app_deploy_ids(self, app_name: str) -> list[int]:
        """Every deploy id of the app, oldest first (its logs go with it when it is removed)."""

    @abc.abstractmethod
    async def reserve_deploy_ids(self, through: int) -> None:
        """Never hand out a deploy id up to `through` (ids of log files found on disk)."""

    @abc.abstractmethod
    async def deploys_in(self, statuses: tuple[DeployStatus, ...]) -> list[Deploy]:
        """Every deploy in one of these states, oldest first (restart recovery)."""

    @abc.abstractmethod
    async def start_deploy(self, deploy_id: int, when: datetime) -> bool:
        """queued -> running with no runner (tools and tests; gateways claim_deploy)."""

    @abc.abstractmethod
    async def finish_deploy(
        self,
        deploy_id: int,
        status: DeployStatus,
        when: datetime,
        *,
        exit_code: int | None = None,
        reason: str = "",
        superseded_by: int | None = None,
        duration_ms: int | None = None,
    ) -> bool:
        """Set a final status on a queued or running deploy; False if it had already ended."""

    @abc.abstractmethod
    async def prune_deploys(self, before: datetime, keep_last: int, limit: int = 500) -> list[int]:
        """Delete up to `limit` finished deploys that ended before `before`, except each
        app's `keep_last` newest finished ones; never a queued or running deploy. Return
        the ids deleted (their webhook deliveries go with them)."""

    @abc.abstractmethod
    async def existing_deploy_ids(self, ids: list[int]) -> set[int]:
        """Which of these deploy ids still have a record."""

    @abc.abstractmethod
    async def set_status_token(self, deploy_id: int, token_hash: str) -> None: ...

    @abc.abstractmethod
    async def status_token_hash(self, deploy_id: int) -> str | None: ...

    @abc.abstractmethod
    async def add_webhook_delivery(self, delivery: WebhookDelivery) -> None: ...

    @abc.abstractmethod
    async def webhook_deliveries(self, deploy_id: int) -> list[WebhookDelivery]: ...


def storable(text: str) -> str:
    """Text every backend stores as is and counts alike: valid UTF-8 (a lone surrogate
    becomes "?") and no NUL (PostgreSQL's text refuses it; U+FFFD instead)."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


@dataclass(frozen=True, slots=True)
class Queued:
    deploy: Deploy
    superseded: list[int]  # the app's deploys that were waiting, now cancelled for it


class DeployQueue(abc.ABC):
    """The deploy queue every gateway process shares: one running deploy per app across
    all of them, at most `max_parallel` per node name, a newer push supersedes what waits."""

    _subscribers: list[Callable[[str, int], None]]  # set by Store.__init__

    @abc.abstractmethod
    async def queue_stats(self) -> tuple[int, datetime | None]:
        """Deploys waiting in the shared queue, and when the oldest of them was queued."""

    @abc.abstractmethod
    async def queue_deploy(self, new: NewDeploy, *, origin: str | None = None) -> Queued:
        """Record a queued deploy and, in the same transaction, cancel the app's deploys
        still waiting (superseded by it). `origin`: the process that must run it (a gated
        push's quarantine lives with it)."""

    @abc.abstractmethod
    async def claim_deploy(
        self,
        node: str,
        node_name: str,
        max_parallel: int,
        only: Sequence[int] | None = None,
    ) -> Deploy | None:
        """Take the oldest queued deploy this process may run (its app runs none, it is
        not gated elsewhere; one of `only` if given) if fewer than `max_parallel` run under
        `node_name` and `node` is still registered: queued -> running, with `node` as its
        runner. None if there is nothing to take."""

    @abc.abstractmethod
    async def request_cancel(self, deploy_id: int, reason: str) -> Deploy | None:
        """Stop a deploy: a queued one is cancelled at once; a running one is marked for
        its runner, which stops it (`cancel_requests`). The record after; None if unknown."""

    @abc.abstractmethod
    async def cancel_requests(self, node: str) -> list[tuple[int, str]]:
        """(deploy id, reason) of this runner's deploys someone asked to stop."""

    @abc.abstractmethod
    async def report_deploy(
        self, deploy_id: int, status: DeployStatus, exit_code: int | None
    ) -> bool:
        """A webhook receiver's final status for a running deploy (the first one counts);
        False if it does not run or has a report already."""

    @abc.abstractmethod
    async def deploy_report(self, deploy_id: int) -> tuple[DeployStatus, int | None] | None:
        """The receiver's report, once there is one."""

    # -- logs --
    @abc.abstractmethod
    async def append_deploy_log(
        self, deploy_id: int, text: str, *, skipped: int = 0, closing: bool = False, keep: int
    ) -> int | None:
        """Append output after `skipped` bytes that were never stored, then delete the oldest
        chunks beyond the last `keep` bytes (never the newest). The chunk's seq; None if the
        deploy has no record."""

    @abc.abstractmethod
    async def deploy_log(self, deploy_id: int, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        """Chunks with seq > `after`, in order, at most `limit` of them."""

    # -- the processes sharing the queue --
    @abc.abstractmethod
    async def register_node(
        self, node: str, name: str, pid: int, address: str | None = None
    ) -> None:
        """Join (or, already there, renew); `address`: where the others forward to it."""

    @abc.abstractmethod
    async def renew_node(self, node: str) -> bool:
        """Renew the process's lease; False if the others declared it gone already."""

    @abc.abstractmethod
    async def expire_nodes(self, lapse: float) -> list[Deploy]:
        """Declare gone the processes that did not renew within `lapse` seconds: their
        running deploys and the gated ones they hold become interrupted, as do running
        deploys with no live runner at all; their homes (RepositoryHomes) go with their
        rows. The deploys interrupted."""

    @abc.abstractmethod
    async def leave_node(self, node: str) -> None:
        """A process that stops: its row goes, with its homes (what it ran was ended by
        it)."""

    @abc.abstractmethod
    async def list_nodes(self) -> list[Node]: ...

    # -- changes other processes make --
    def subscribe(self, callback: Callable[[str, int], None]) -> None:
        """Call `callback(kind, deploy_id)` when a deploy changes ("queue", "log", "done",
        "cancel", "report"): for this process's own changes, and for others' where the
        backend can tell (PostgreSQL's LISTEN/NOTIFY). Where it cannot, callers poll."""
        self._subscribers.append(callback)

    @property
    def hears_others(self) -> bool:
        """True while changes made by other processes are heard (see subscribe)."""
        return False

    async def start_listening(self) -> None:  # noqa: B027 - a backend may hear nothing
        """Begin hearing other processes' changes, where the backend can."""

    def _announce(self, kind: str, deploy_id: int = 0) -> None:
        for callback in list(self._subscribers):
            callback(kind, deploy_id)


class RepositoryHomes(abc.ABC):
    """Which node serves each app's repository (its home): one at a time across the cluster.

    A home has no lease of its own: it lives as long as its node's row in the queue's
    leases (DeployQueue.register_node, renew_node). When the node is declared gone
    (expire_nodes) or leaves (leave_node), its homes go with it, and the next node that
    needs one of those apps claims it; removing an app removes its home."""

    @abc.abstractmethod
    async def claim_home(self, app_id: int, node: str) -> Home | None:
        """The app's home node, made `node` if the app has none (atomic: racing claims all
        get the one winner). None if the app has no home and `node` may not take it,
        not being registered (declared gone: it joins again first). NotFound if there is
        no such app."""

    @abc.abstractmethod
    async def home_of(self, app_id: int) -> Home | None:
        """The app's home node; None while it has none (no node claimed it, or its node
        is gone)."""

    @abc.abstractmethod
    async def homes_of(self, node: str) -> list[int]:
        """The ids of the apps whose home `node` is, in order."""

    @abc.abstractmethod
    async def release_homes(self, node: str, apps: Sequence[int] | None = None) -> int:
        """Give up the homes of `node` (those of `apps` only, if given): a drain; the next
        node that needs each app takes it. How many were given up."""


class AuditTrail(abc.ABC):
    """Security-relevant events, newest first, with retention."""

    # -- audit trail --
    @abc.abstractmethod
    async def add_audit(self, event: AuditEvent) -> None: ...

    @abc.abstractmethod
    async def prune_audit(self, before: datetime, limit: int = 5000) -> int:
        """Delete up to `limit` of the oldest events recorded before `before`; return how many."""

    @abc.abstractmethod
    async def list_audit(
        self, app: str | None = None, actor: str | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        """Most recent events first, optionally for one app and/or one user (events by
        them, and changes made to their account)."""


class AccessTokens(abc.ABC):
    """API tokens (only hashes stored) and the keys page's sessions."""

    # -- API tokens --
    @abc.abstractmethod
    async def create_token(
        self,
        name: str,
        user_name: str | None,
        token_hash: str,
        expires_at: datetime | None = None,
    ) -> ApiToken:
        """Conflict if the name is taken; NotFound if the user does not exist."""

    @abc.abstractmethod
    async def list_tokens(self) -> list[ApiToken]: ...

    @abc.abstractmethod
    async def remove_token(self, name: str) -> ApiToken: ...

    @abc.abstractmethod
    async def token_by_hash(self, token_hash: str) -> ApiToken | None: ...

    @abc.abstractmethod
    async def touch_token(self, token_id: int, when: datetime) -> None: ...

    # -- keys page sessions (only a hash of each session id is stored) --
    @abc.abstractmethod
    async def create_web_session(
        self, id_hash: str, token_id: int, created_at: datetime, expires_at: datetime, keep: int
    ) -> None:
        """Record a session; the token's oldest sessions beyond the newest `keep` end."""

    @abc.abstractmethod
    async def web_session(self, id_hash: str) -> WebSession | None: ...

    @abc.abstractmethod
    async def touch_web_session(self, id_hash: str, when: datetime) -> None: ...

    @abc.abstractmethod
    async def remove_web_session(self, id_hash: str) -> bool:
        """End a session; False if there was none."""

    @abc.abstractmethod
    async def prune_web_sessions(self, now: datetime, idle_since: datetime) -> int:
        """Delete sessions past their end or not seen since `idle_since`; how many."""


class Lifecycle(abc.ABC):
    """Transactions, schema version, probes and closing."""

    # -- transactions --
    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """`async with store.transaction():` makes the calls this task makes on the store
        inside the block one transaction: all take effect, or none if the block raises.
        Blocks nest; each call is itself a nested step, so a domain error caught inside the
        block undoes only that call. Other tasks do not see the changes before the block
        ends (on SQLite they wait for it). Start no task that uses the store inside it."""

    # -- lifecycle --
    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The number of the newest migration applied."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the registry cannot be read (readiness probe)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class Store(
    UsersAndKeys,
    AppsAndMembers,
    DeployRecords,
    DeployQueue,
    RepositoryHomes,
    AuditTrail,
    AccessTokens,
    Lifecycle,
):
    """All registry reads and writes. Domain errors (NotFound, Conflict...) come out, never SQL.

    Ids (users, keys, apps, deploys, audit events, tokens) are never handed out twice, not
    even after the row holding the highest one is deleted.
    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[str, int], None]] = []


async def open_store(database: Path | str) -> Store:
    """Open the registry named by the config (a SQLite file, or a postgresql:// URL),
    applying its pending migrations."""
    text = str(database)
    if is_postgres(text):
        from .postgres import PostgresStore

        return await PostgresStore.open(text)
    from .sqlite import SQLiteStore

    return await SQLiteStore.open(Path(text))
