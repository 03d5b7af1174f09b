"""The server's file-creation mask: everything it creates is private to the service user."""

from __future__ import annotations

import os

# The registry (with its -wal and -shm files), deploy logs, repositories and the control
# socket hold every tenant's keys, code and output: readable by the service user only, even
# when the unit or shell that starts the gateway has a looser umask.
PRIVATE = 0o077

_inherited: int | None = None


def make_private() -> int:
    """Set the private umask for this process; return (and remember) the one it replaces."""
    global _inherited
    previous = os.umask(PRIVATE)
    if _inherited is None:
        _inherited = previous
    return previous


def inherited() -> int | None:
    """The umask the gateway was started with (None before make_private), for programs it
    runs on the operator's behalf whose files others may need to read (deploy commands)."""
    return _inherited
