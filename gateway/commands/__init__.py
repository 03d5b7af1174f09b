"""Parse the SSH command line into one of the allowed commands; anything else is refused."""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AccessDenied, InvalidName, UnknownCommand, printable
from ..names import app_name

if TYPE_CHECKING:
    from ..bridge import Channel
    from ..config import Config
    from ..deploys import DeployService
    from ..gitbin import Git
    from ..metrics import Metrics
    from ..models import Identity
    from ..packcache import PackCache
    from ..repos import Repositories
    from ..store import Store

MAX_COMMAND_LENGTH = 4096

# git sends the repository path quoted in several forms depending on the URL the user typed:
# host:app.git -> 'app.git', ssh://host/app.git -> '/app.git', ssh://host/~/app.git -> '~/app.git'.
GIT_SERVICES = ("git-upload-pack", "git-receive-pack", "git-upload-archive")
KNOWN_COMMANDS = (*GIT_SERVICES, "info", "deploys", "logs", "cancel")


def command_label(command: str | None) -> str:
    """A bounded metric label for a raw SSH command line (never the client's text)."""
    words = (command or "").split()
    if not words:
        return "info"
    if len(words) >= 2 and words[0] == "git" and f"git-{words[1]}" in GIT_SERVICES:
        return f"git-{words[1]}"
    return words[0] if words[0] in KNOWN_COMMANDS else "other"


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
    store: Store
    repos: Repositories
    git: Git
    deploys: DeployService
    metrics: Metrics | None = None
    stats: SessionStats = field(default_factory=SessionStats)
    client_protocol: str | None = None
    conn_id: str = "-"
    peer: str = "-"
    pack_cache: PackCache | None = None


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


def _deploy_id(text: str) -> str:
    digits = text.removeprefix("#")
    if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise UnknownCommand(f"invalid deploy id '{printable(text, 20)}'")
    return str(int(digits))


def parse(command: str | None) -> Invocation:
    """Turn the exec request into an Invocation; no command at all means `info`."""
    if command is None or not command.strip():
        return Invocation("info", ())
    if len(command) > MAX_COMMAND_LENGTH or "\x00" in command:
        raise UnknownCommand("command refused")
    try:
        # POSIX shell-style word splitting only: nothing is ever run by a shell.
        words = shlex.split(command)
    except ValueError:
        raise UnknownCommand("malformed command") from None
    if not words:
        return Invocation("info", ())
    # Git for Windows and some libraries send the two-word form.
    if len(words) >= 2 and words[0] == "git" and f"git-{words[1]}" in GIT_SERVICES:
        words = [f"git-{words[1]}", *words[2:]]
    name = words[0]
    if name in GIT_SERVICES:
        if len(words) != 2:
            raise UnknownCommand(f"usage: {name} '<app>.git'")
        return Invocation(name, (repo_path_to_app(words[1]),))
    if name == "info" and len(words) == 1:
        return Invocation("info", ())
    if name == "deploys" and len(words) == 2:
        return Invocation("deploys", (repo_path_to_app(words[1]),))
    if name == "logs" and 2 <= len(words) <= 4:
        follow = [w for w in words[2:] if w in ("--follow", "-f")]
        rest = [w for w in words[2:] if w not in ("--follow", "-f")]
        if len(follow) <= 1 and len(rest) <= 1:
            deploy_id = _deploy_id(rest[0]) if rest else ""
            return Invocation(
                "logs", (repo_path_to_app(words[1]), deploy_id, "follow" if follow else "")
            )
        raise UnknownCommand("usage: logs APP [DEPLOY_ID] [--follow]")
    if name == "cancel" and len(words) == 2:
        return Invocation("cancel", (_deploy_id(words[1]),))
    raise UnknownCommand(
        f"unknown command '{printable(name, 40)}': this server serves git (clone, fetch, push, "
        "archive --remote) and: deploys APP, logs APP [ID] [--follow], cancel ID"
    )
