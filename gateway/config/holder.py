"""The running configuration: one value every part reads at use, replaced whole by a reload,
and the addresses the SSH listener actually bound."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from .schema import Config

T = TypeVar("T")

# Sections a running gateway cannot change: its sockets, host keys, state and git runtime
# were set up from them at start. A reload keeps the running ones and says so.
RESTART_SECTIONS = ("git", "http", "server", "ssh", "storage")
# Keys of sections a reload applies that are taken at start all the same: earlier deploys'
# logs are read from the log directory the gateway started with, the log handler is built
# once, and this node is registered in the cluster under its name.
RESTART_KEYS = (
    ("cluster", "node_name"),
    ("cluster", "listen"),
    ("cluster", "advertise"),
    ("cluster", "peers"),
    ("cluster", "forward"),
    ("deploy", "log_dir"),
    ("log", "format"),
)


def at_use(value: T | Callable[[], T]) -> T:
    """A setting given either as a value (tests, one-off tools) or as a callable reading the
    running configuration (the server, so that a reload reaches it)."""
    return value() if callable(value) else value


class Settings:
    """The configuration a running gateway uses: `current`, read at use by every part that
    needs a setting; `reload` replaces it once (what must act on a change rather than read
    a value, a log level say, is called by the reloader)."""

    def __init__(self, loaded: Config, running: Config | None = None) -> None:
        # As read from the file at start: what a reload's restart-only sections compare with.
        self.loaded = loaded
        # What this process runs (a worker's view differs from the file: see workers.adapt).
        self._current = running if running is not None else loaded
        # Where the SSH listener listens, once it does (port 0 asks the OS for one).
        self.ssh_addresses: list[tuple[str, int]] = []

    @property
    def current(self) -> Config:
        return self._current

    def bound(self, addresses: list[tuple[str, int]]) -> None:
        """The SSH listener listens on `addresses`. With `[ssh] listen` on port 0, what users
        are shown (clone URLs, `ssh -p PORT` commands) names the port the OS gave, wherever
        it is shown (API, SSH `info`, deploy messages, webhooks)."""
        self.ssh_addresses = list(addresses)
        host, port = self._current.ssh.listen
        if port == 0 and addresses:
            ssh = dataclasses.replace(self._current.ssh, listen=(host, addresses[0][1]))
            self._current = dataclasses.replace(self._current, ssh=ssh)

    def reload(self, new: Config) -> list[str]:
        """Run `new` (a freshly loaded file) for everything that can change while running:
        [limits], [deploy], [audit], [log] level, [cluster] node_timeout and [apps.*]. The
        restart-only sections and keys (RESTART_SECTIONS, RESTART_KEYS) stay as they run;
        returned: those that differ, as `section` or `section.key`."""
        running = self._current
        needs_restart = [s for s in RESTART_SECTIONS if getattr(new, s) != getattr(self.loaded, s)]
        kept = {section: getattr(running, section) for section in RESTART_SECTIONS}
        for section, key in RESTART_KEYS:
            # Several keys of one section: each keeps its running value in turn.
            values = kept.get(section, getattr(new, section))
            if getattr(values, key) != getattr(getattr(running, section), key):
                needs_restart.append(f"{section}.{key}")
                values = dataclasses.replace(
                    values, **{key: getattr(getattr(running, section), key)}
                )
            kept[section] = values
        self._current = dataclasses.replace(new, **kept)
        return needs_restart
