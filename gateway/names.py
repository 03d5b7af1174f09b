"""Allow-lists for every name that comes from outside: apps, users, key names, branches."""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidName, printable

# Apps name directories on disk and appear in URLs: lowercase, digits, '-' and '_', and a
# first character that can never be '.', '-' or '/'.
APP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
USER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
# Characters git refuses anywhere in a ref name (git-check-ref-format(1), rules 4, 5, 10).
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
# Beyond git's rules, a deploy branch is shown in terminals, URLs and logs: no invisible or
# text-reordering characters (bidi controls, zero-width space...), no exotic spaces.
_BRANCH_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
MAX_BRANCH_BYTES = 255


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


def ref_problem(refname: str) -> str | None:
    """Why git would refuse this full ref name (`git check-ref-format` rules), or None."""
    if refname == "@":
        return "'@' alone is not a ref name"
    if _REF_FORBIDDEN.search(refname):
        return "no spaces, control characters, '~', '^', ':', '?', '*', '[' or '\\'"
    if ".." in refname:
        return "no '..'"
    if "@{" in refname:
        return "no '@{'"
    if refname.startswith("/") or refname.endswith("/") or "//" in refname:
        return "no empty part between slashes, no slash at the start or end"
    if refname.endswith("."):
        return "no '.' at the end"
    for part in refname.split("/"):
        if part.startswith("."):
            return "no part starting with '.'"
        if part.endswith(".lock"):
            return "no part ending with '.lock'"
    return None


def ref_name(refname: str) -> str:
    """A full ref name (refs/...) exactly as git accepts it."""
    problem = ref_problem(refname)
    if problem is not None or not refname.startswith("refs/"):
        raise InvalidName(
            f"invalid ref name '{printable(refname)}': {problem or 'not under refs/'}"
        )
    return refname


def branch_problem(name: str) -> str | None:
    """Why `name` is not accepted as a deploy branch, or None.

    git's own rules (`git check-ref-format --branch`), implemented here, plus a length cap
    and no invisible or exotic-space characters: any other name git accepts (commas,
    non-ASCII letters, '@', '+'...) is accepted.
    """
    if not name:
        return "it is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_BRANCH_BYTES:
        return f"longer than {MAX_BRANCH_BYTES} bytes"
    if name.startswith("-"):
        return "it starts with '-'"
    if name == "HEAD":
        return "'HEAD' is reserved"
    problem = ref_problem(f"refs/heads/{name}")
    if problem is not None:
        return problem
    if any(not c.isascii() and unicodedata.category(c) in _BRANCH_UNSAFE_CATEGORIES for c in name):
        return "no invisible, control or non-ASCII space characters"
    return None


def branch_name(name: str) -> str:
    """A branch name git accepts (see branch_problem); one clear line otherwise."""
    problem = branch_problem(name)
    if problem is not None:
        raise InvalidName(f"invalid branch name '{printable(name)}': {problem}")
    return name
