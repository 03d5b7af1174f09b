"""The git runtime: locate the binary, check its version, build the environment it runs in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import GitUnavailable

MIN_VERSION = (2, 30)

# GIT_PROTOCOL is the only thing a client may pass through to git; its values look like
# "version=2" or "version=2:key=value". Anything else is dropped.
_GIT_PROTOCOL = re.compile(r"[A-Za-z0-9._=:-]{1,200}")


@dataclass(frozen=True)
class Git:
    path: str
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def locate(binary: str, env_path: str | None = None) -> Git:
    """Find git and check it is recent enough; raise GitUnavailable with a clear reason."""
    path = binary if os.sep in binary else shutil.which(binary, path=env_path)
    if not path or not os.access(path, os.X_OK):
        raise GitUnavailable(
            f"git not found ('{binary}'): git >= {'.'.join(map(str, MIN_VERSION))} is required "
            "on the server (Debian/Ubuntu: apt-get install git)"
        )
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise GitUnavailable(f"cannot run {path} --version: {exc}") from None
    match = re.search(r"git version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise GitUnavailable(f"unrecognised git version output: {out.strip()!r}")
    version = tuple(int(g) for g in match.groups() if g is not None)
    if version[:2] < MIN_VERSION:
        raise GitUnavailable(
            f"git {'.'.join(map(str, version))} at {path} is too old: "
            f"git >= {'.'.join(map(str, MIN_VERSION))} is required"
        )
    return Git(path, version)


def environment(home: Path, client_protocol: str | None = None, **extra: str) -> dict[str, str]:
    """A minimal environment for git processes: nothing inherited from the client except a
    validated GIT_PROTOCOL, and no user/system git config so repositories behave only as
    their own config says."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "LANG": "C",
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
    }
    if client_protocol and _GIT_PROTOCOL.fullmatch(client_protocol):
        env["GIT_PROTOCOL"] = client_protocol
    env.update(extra)
    return env
