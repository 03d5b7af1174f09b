"""Exception hierarchy: each error carries one user-facing line and an exit code."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class; ``str(err)`` is the single line shown to the user.

    `code` is the stable machine-readable name the HTTP API returns with it.
    """

    exit_code = 1
    code = "error"


class UsageError(GatewayError):
    """Bad command-line usage or arguments (exit 2)."""

    exit_code = 2
    code = "bad_request"


class ConfigError(GatewayError):
    """Invalid or unreadable configuration (exit 2)."""

    exit_code = 2
    code = "config"


class NotFound(GatewayError):
    """A user, key or app named by the operator does not exist."""

    code = "not_found"


class Conflict(GatewayError):
    """The request clashes with what is already registered."""

    code = "conflict"


class InvalidName(GatewayError):
    """A user, key, app or branch name fails its allow-list."""

    code = "invalid_name"


class InvalidKey(GatewayError):
    """A public key offered for registration is refused."""

    code = "invalid_key"


class KeyInUse(Conflict):
    """The key is already registered on another account."""

    code = "key_in_use"

    def __init__(self) -> None:
        super().__init__("this SSH key is already used by another account")


class KeyLimitReached(Conflict):
    """An account (or an app, for deploy keys) has as many keys as [limits] allows."""

    code = "conflict"

    def __init__(self, owner: str, limit: int, deploy: bool = False) -> None:
        what = (
            f"app {owner} has {limit} deploy keys, the most an app may have"
            if deploy
            else (f"{owner} has {limit} keys, the most an account may have")
        )
        super().__init__(f"{what} ([limits] max_keys_per_user): remove one first")


class AccessDenied(GatewayError):
    """Unknown app, forbidden app and invalid path all look the same to the user."""

    code = "not_found"

    def __init__(self, name: str, why: str = "") -> None:
        # `why` may only say what the caller already knows (its own key), never about `name`.
        suffix = f": {why}" if why else ""
        super().__init__(f"repository '{printable(name)}' not found or access denied{suffix}")
        self.name = name


class UnknownCommand(GatewayError):
    """An SSH command outside the allow-list (git's fatal exit code)."""

    exit_code = 128
    code = "unknown_command"


class Unauthorized(GatewayError):
    """An HTTP request without a valid token."""

    code = "unauthorized"


class Forbidden(GatewayError):
    """A valid token that does not allow this request."""

    code = "forbidden"


class StoreUnavailable(GatewayError):
    """The registry's database cannot be reached now (a PostgreSQL restart, a network cut):
    the same line for every user, the driver's details in the operator's log."""

    code = "unavailable"

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message or "temporarily unavailable: the registry cannot be reached; try again shortly"
        )


class GitUnavailable(GatewayError):
    """git is missing or older than the supported minimum."""

    exit_code = 2
    code = "git_unavailable"


def printable(text: str, limit: int = 80) -> str:
    """Escape control and non-ASCII characters so echoed input cannot drive a terminal."""
    out = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."
