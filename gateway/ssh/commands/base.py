"""What every SSH command shares: its context, its invocation, its table entry, and the readers
that turn the words after its name into arguments."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...errors import AccessDenied, InvalidName, UnknownCommand, printable
from ...names import app_name

if TYPE_CHECKING:
    from ...config import Config
    from ...deploys import DeployService
    from ...domain.facade import Domain
    from ...git.bridge import Channel
    from ...git.gitbin import Git
    from ...git.packcache import PackCache
    from ...git.repos import Repositories
    from ...metrics import Metrics
    from ...models import Identity
    from ..forward import Forwarder
    from ..limits import Admission

# git sends the repository path quoted in several forms depending on the URL the user typed:
# host:app.git -> 'app.git', ssh://host/app.git -> '/app.git', ssh://host/~/app.git -> '~/app.git'.
GIT_SERVICES = ("git-upload-pack", "git-receive-pack", "git-upload-archive")


@dataclass
class SessionStats:
    """What a command reports back about its session, for the connection's summary line."""

    bytes_in: int = 0
    bytes_out: int = 0
    outcome: str = "ok"


@dataclass
class Context:
    """Everything a command may use: the verified identity, the session's streams, services."""

    identity: Identity
    channel: Channel
    config: Config
    domain: Domain
    repos: Repositories
    git: Git
    deploys: DeployService
    metrics: Metrics | None = None
    stats: SessionStats = field(default_factory=SessionStats)
    client_protocol: str | None = None
    conn_id: str = "-"
    peer: str = "-"
    pack_cache: PackCache | None = None
    # Fingerprints the client offered before the key that logged in, not registered here.
    refused_keys: tuple[str, ...] = ()
    # The node's per-user caps ([limits] max_fetches_per_user); None: not counted.
    admission: Admission | None = None
    # The connections to the other nodes, when repositories are served by their home node.
    forwarder: Forwarder | None = None


Handler = Callable[[Context, "Invocation"], Awaitable[int]]


@dataclass(frozen=True)
class Invocation:
    command: str
    args: tuple[str, ...]

    @property
    def app(self) -> str:
        return self.args[0]


def repo_path_to_app(path: str) -> str:
    """Map a path as git sends it to an app name, or raise AccessDenied."""
    name = path
    if name.startswith("~/"):
        name = name[2:]
    elif name.startswith("/"):
        name = name[1:]
    name = name.removesuffix("/").removesuffix(".git")
    try:
        return app_name(name)
    except InvalidName:
        raise AccessDenied(path) from None


def deploy_id(text: str) -> str:
    digits = text.removeprefix("#")
    if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise UnknownCommand(f"invalid deploy id '{printable(text, 20)}'")
    return str(int(digits))


class Usage(Exception):
    """The words after a command's name do not fit any of its forms."""


def no_words(words: list[str]) -> tuple[str, ...]:
    if words:
        raise Usage
    return ()


def app_only(words: list[str]) -> tuple[str, ...]:
    if len(words) != 1:
        raise Usage
    return (repo_path_to_app(words[0]),)


@dataclass(frozen=True)
class Command:
    """One command besides git's: its forms (for `help` and usage errors), what it does, how
    the words after its name become its arguments, and the handler that serves it."""

    name: str
    forms: tuple[str, ...]
    summary: str
    read: Callable[[list[str]], tuple[str, ...]]
    run: Handler
    takes_app: bool = False  # its first argument is an app name
    rated: bool = False  # counted against [limits] user_ops_per_minute, as git operations are
