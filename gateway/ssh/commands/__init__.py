"""Parse the SSH command line into one of the allowed commands; anything else is refused."""

from __future__ import annotations

import shlex
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
    from ...store import Store
    from ..limits import Admission

MAX_COMMAND_LENGTH = 4096

# git sends the repository path quoted in several forms depending on the URL the user typed:
# host:app.git -> 'app.git', ssh://host/app.git -> '/app.git', ssh://host/~/app.git -> '~/app.git'.
GIT_SERVICES = ("git-upload-pack", "git-receive-pack", "git-upload-archive")


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
    # Only `cancel`'s, until the one audited cancel in gateway.deploys: every other command
    # does its domain work through `domain` (pyproject.toml's import contract).
    store: Store
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


class _Usage(Exception):
    """The words after a command's name do not fit any of its forms."""


def _none(words: list[str]) -> tuple[str, ...]:
    if words:
        raise _Usage
    return ()


def _app_only(words: list[str]) -> tuple[str, ...]:
    if len(words) != 1:
        raise _Usage
    return (repo_path_to_app(words[0]),)


def _logs(words: list[str]) -> tuple[str, ...]:
    follow = [w for w in words[1:] if w in ("--follow", "-f")]
    rest = [w for w in words[1:] if w not in ("--follow", "-f")]
    if not 1 <= len(words) <= 3 or len(follow) > 1 or len(rest) > 1:
        raise _Usage
    deploy_id = _deploy_id(rest[0]) if rest else ""
    return (repo_path_to_app(words[0]), deploy_id, "follow" if follow else "")


def _cancel(words: list[str]) -> tuple[str, ...]:
    if len(words) != 1:
        raise _Usage
    return (_deploy_id(words[0]),)


MAX_KEY_APPS = 100


def _keys(words: list[str]) -> tuple[str, ...]:
    """`keys`, `keys remove NAME`, `keys add NAME [--expires WHEN] [--read-only] [--app APP]...`
    as ("list",), ("remove", NAME, "", ""), ("add", NAME, WHEN, "read-only" or "", APP...).
    Names, expiry and apps are then checked by the registry's rules."""
    if not words or words == ["list"]:
        return ("list",)
    if len(words) == 2 and words[0] == "remove":
        return ("remove", words[1], "", "")
    if len(words) < 2 or words[0] != "add" or words[1].startswith("-"):
        raise _Usage
    expires, read_only, apps = "", "", []
    rest = words[2:]
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=")
        if name in ("--expires", "--app") and not eq:
            if not rest:
                raise _Usage
            value = rest.pop(0)
        if name == "--expires" and not expires:
            expires = value
        elif name == "--app" and len(apps) < MAX_KEY_APPS:
            apps.append(value)
        elif word == "--read-only":
            read_only = "read-only"
        else:
            raise _Usage
    return ("add", words[1], expires, read_only, *apps)


@dataclass(frozen=True)
class Syntax:
    """One command besides git's: its forms (for `help` and usage errors), what it does,
    and how the words after its name become its arguments."""

    name: str
    forms: tuple[str, ...]
    summary: str
    read: Callable[[list[str]], tuple[str, ...]]
    takes_app: bool = False  # its first argument is an app name
    rated: bool = False  # counted against [limits] user_ops_per_minute, as git operations are


# Every command a session may run besides git's own, in the order `help` lists them.
COMMANDS: dict[str, Syntax] = {
    s.name: s
    for s in (
        Syntax("info", ("info",), "who you are and the apps you reach (also: no command)", _none),
        Syntax("whoami", ("whoami",), "your account and the key this connection used", _none),
        Syntax(
            "keys",
            (
                "keys",
                "keys add NAME [--expires WHEN] [--read-only] [--app APP]... < KEY.pub",
                "keys remove NAME",
            ),
            "list, add or remove the SSH keys of your account",
            _keys,
            rated=True,
        ),
        Syntax("deploys", ("deploys APP",), "an app's recent deploys", _app_only, True),
        Syntax(
            "logs",
            ("logs APP [ID] [--follow]",),
            "a deploy's log (the latest by default)",
            _logs,
            True,
        ),
        Syntax("cancel", ("cancel ID",), "cancel a queued or running deploy", _cancel),
        Syntax("help", ("help",), "this list", _none),
    )
}
KNOWN_COMMANDS = (*GIT_SERVICES, *COMMANDS)


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
    syntax = COMMANDS.get(name)
    if syntax is None:
        raise UnknownCommand(
            f"unknown command '{printable(name, 40)}': this server serves git (clone, fetch, "
            f"push, archive --remote) and: {', '.join(COMMANDS)} ('help' describes them)"
        )
    try:
        return Invocation(name, syntax.read(words[1:]))
    except _Usage:
        raise UnknownCommand("usage: " + " | ".join(syntax.forms)) from None
