"""Push options (`git push -o ...`): the allow-list, and what a push asked of its deploy.

git hands the options to the hooks (GIT_PUSH_OPTION_*), which forward them cut short (see
gateway/git/hooks.py). They are the pusher's text: anything not on the allow-list, malformed or
contradictory refuses the push in pre-receive, before any ref moves, with one line.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from ..git.hooks import MAX_OPTION_LENGTH as MAX_LENGTH
from ..git.hooks import MAX_OPTIONS as MAX_COUNT

MAX_NOTE = 200  # characters of a deploy note

SKIP, DETACH, ATTACH, NOTE = "deploy.skip", "deploy.detach", "deploy.attach", "deploy.note"
FLAGS = (SKIP, DETACH, ATTACH)
KNOWN = (*FLAGS, f"{NOTE}=TEXT")
HELP = "known push options: " + ", ".join(KNOWN)


class OptionError(ValueError):
    """A push option the gateway refuses; the text is the pusher's one line."""


@dataclass(frozen=True, slots=True)
class PushOptions:
    skip: bool = False
    detach: bool = False
    attach: bool = False
    note: str | None = None

    @property
    def given(self) -> bool:
        return self.skip or self.detach or self.attach or self.note is not None

    def words(self) -> list[str]:
        """The options as the pusher gave them (for the audit trail)."""
        flags = [(SKIP, self.skip), (DETACH, self.detach), (ATTACH, self.attach)]
        found = [name for name, given in flags if given]
        return found + ([f"{NOTE}={self.note}"] if self.note is not None else [])

    def mode(self, configured: str) -> str:
        """The deploy mode this push asks for, given the app's: attached or detached may be
        swapped for the other; gate mode is never changed."""
        if configured == "gate":
            return configured
        if self.detach:
            return "detached"
        if self.attach:
            return "attached"
        return configured


NONE = PushOptions()


def _shown(text: str) -> str:
    """A refused option as the pusher sees it in the error: short, one line, printable."""
    cut = text[:40]
    safe = "".join(c if c.isprintable() else "?" for c in cut)
    return safe + ("..." if len(text) > 40 else "")


def _note(value: str) -> str:
    note = value.strip()
    if not note:
        raise OptionError(f"{NOTE} needs a text: -o {NOTE}='what this deploy is'")
    if len(note) > MAX_NOTE:
        raise OptionError(f"{NOTE} is {len(note)} characters long; at most {MAX_NOTE}")
    # Printable text on one line only: a note is shown in tables, logs and terminals.
    # Categories C* are control, format (bidi overrides), surrogates and unassigned; Zl and
    # Zp are the line and paragraph separators (U+2028, U+2029) some viewers break on.
    if any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")
           for c in note):  # fmt: skip
        raise OptionError(f"{NOTE} may hold printable characters only, on one line")
    return note


def parse(raw: Any) -> PushOptions:
    """The options of one push as the hook reported them (a list of strings, or nothing)."""
    if raw is None:
        return NONE
    if not isinstance(raw, list) or not all(isinstance(o, str) for o in raw):
        raise OptionError("the push options could not be read")
    if len(raw) > MAX_COUNT:
        raise OptionError(f"too many push options (at most {MAX_COUNT}); {HELP}")
    flags: set[str] = set()
    note: str | None = None
    for option in raw:
        if len(option) > MAX_LENGTH:
            raise OptionError(f"push option too long: {_shown(option)}")
        name, eq, value = option.partition("=")
        if name == NOTE and eq:
            if note is not None:
                raise OptionError(f"{NOTE} given twice")
            note = _note(value)
        elif name in FLAGS:
            if eq:
                raise OptionError(f"{name} takes no value: -o {name}")
            flags.add(name)
        else:
            raise OptionError(f"unknown push option '{_shown(option)}'; {HELP}")
    if DETACH in flags and ATTACH in flags:
        raise OptionError(f"{DETACH} and {ATTACH} contradict each other: give one")
    if SKIP in flags and (flags - {SKIP} or note is not None):
        raise OptionError(f"{SKIP} deploys nothing: it cannot go with other deploy options")
    return PushOptions(SKIP in flags, DETACH in flags, ATTACH in flags, note)
