"""Exception hierarchy: each error carries one user-facing line and an exit code."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class; ``str(err)`` is the single line shown to the user."""

    exit_code = 1


class UsageError(GatewayError):
    """Bad command-line usage or arguments (exit 2)."""

    exit_code = 2


class ConfigError(GatewayError):
    """Invalid or unreadable configuration (exit 2)."""

    exit_code = 2


class NotFound(GatewayError):
    """A user, key or app named by the operator does not exist."""


class Conflict(GatewayError):
    """The request clashes with what is already registered."""


class InvalidName(GatewayError):
    """A user, key, app or branch name fails its allow-list."""


class InvalidKey(GatewayError):
    """A public key offered for registration is refused."""


class KeyInUse(Conflict):
    """The key is already registered on another account."""

    def __init__(self) -> None:
        super().__init__("this SSH key is already used by another account")


class AccessDenied(GatewayError):
    """Unknown app, forbidden app and invalid path all look the same to the user."""

    def __init__(self, name: str) -> None:
        super().__init__(f"repository '{printable(name)}' not found or access denied")
        self.name = name


class UnknownCommand(GatewayError):
    """An SSH command outside the allow-list (git's fatal exit code)."""

    exit_code = 128


class GitUnavailable(GatewayError):
    """git is missing or older than the supported minimum."""

    exit_code = 2


def printable(text: str, limit: int = 80) -> str:
    """Escape control and non-ASCII characters so echoed input cannot drive a terminal."""
    out = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."
