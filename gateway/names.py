"""Allow-lists for every name that comes from outside: apps, users, key names, branches."""

from __future__ import annotations

import re

from dulwich.refs import check_ref_format

from .errors import InvalidName, printable

# Apps name directories on disk and appear in URLs: lowercase, digits, '-' and '_', and a
# first character that can never be '.', '-' or '/'.
APP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
USER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
BRANCH_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


def app_name(name: str) -> str:
    if not APP_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid app name '{printable(name)}': use 1-63 lowercase letters, digits, '-' "
            "or '_', starting with a letter or digit"
        )
    return name


def user_name(name: str) -> str:
    if not USER_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid user name '{printable(name)}': use 1-63 lowercase letters, digits, '.', '-' "
            "or '_', starting with a letter or digit"
        )
    return name


def key_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid key name '{printable(name)}': use 1-64 letters, digits, '.', '_', '@', '+' "
            "or '-', starting with a letter or digit"
        )
    return name


def token_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid token name '{printable(name)}': use 1-64 letters, digits, '.', '_', '@', "
            "'+' or '-', starting with a letter or digit"
        )
    return name


def branch_name(name: str) -> str:
    """A branch name git accepts, restricted to a conservative character set."""
    ok = bool(BRANCH_CHARS.fullmatch(name)) and check_ref_format(f"refs/heads/{name}".encode())
    if not ok or name.endswith("/") or "//" in name:
        raise InvalidName(f"invalid branch name '{printable(name)}'")
    return name
