"""Run the shell blocks of the docs as a user pastes them, and check the output they show.

A block is a fenced ```sh block. In the README only blocks tagged with an HTML comment on the
line before (`<!-- quickstart -->`, `<!-- serve-command -->`...) belong to a walk; in the other
pages every ```sh block does. Words after the tag's name are instructions to the runner:
`reload` waits until every worker of the gateway reloaded its configuration; `background`
starts the block and goes on (it runs until the walk ends). Lines `# ...` inside a block are
the output it shows: each must match a line the block printed, `...` matching anything and
numbers any number.

Isolation without editing what the user reads: the blocks run in a copy of the repository with
their own HOME, git identity and free ports (2222 and 8080 in the text become free ports), and
`ssh` on PATH is a wrapper that keeps OpenSSH off the real user's ~/.ssh (OpenSSH reads the
passwd home directory, not $HOME).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import REPO_ROOT, LiveProcess, run

_TAG = re.compile(r"^\s*<!--\s*([\w-]+)((?:\s+[\w-]+)*)\s*-->\s*$")
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
BLOCK_TIMEOUT = 300


@dataclass
class Block:
    """One shell block: its commands and the output lines it promises."""

    source: str  # file:line, for messages
    text: str
    tag: str = ""
    options: tuple[str, ...] = ()
    expected: list[str] = field(default_factory=list)


def blocks(path: Path, tag: str | None = None) -> list[Block]:
    """The ```sh blocks of a Markdown file (with `tag`: only those tagged so)."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    pending: tuple[str, tuple[str, ...]] = ("", ())
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := _TAG.match(line):
            pending = (match.group(1), tuple(match.group(2).split()))
            index += 1
            continue
        fence = _FENCE.match(line)
        if fence is None:
            if line.strip():
                pending = ("", ())
            index += 1
            continue
        indent, language = fence.group(1), fence.group(2)
        start, body = index + 1, []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][len(indent) :])
            index += 1
        index += 1
        if language == "sh" and (tag is None or pending[0] == tag):
            expected = [b[2:] for b in body if b.startswith("# ")]
            found.append(Block(f"{path.name}:{start}", "\n".join(body) + "\n", *pending, expected))
        pending = ("", ())
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pattern(expected: str) -> re.Pattern[str]:
    """An output line shown in the docs as a regular expression: `...` is anything, a number
    any number."""
    parts = re.split(r"(\.\.\.|\d+)", expected)
    regex = "".join(
        ".*" if part == "..." else r"\d+" if part.isdigit() else re.escape(part) for part in parts
    )
    return re.compile(regex)


class Walk:
    """A shell session through the docs: a checkout, a HOME, free ports, the blocks in order
    (the working directory and exported variables carry over from one block to the next)."""

    def __init__(
        self,
        tmp: Path,
        ports: tuple[str, ...] = (),
        values: dict[str, str] | None = None,
        user: tuple[int, int] | None = None,
    ) -> None:
        self.tmp = tmp
        # (uid, gid): the blocks run as that user (a normal user, where the tests run as
        # root); `tmp` and its parents must be reachable by it.
        self.user = user
        self.credentials: dict[str, object] = (
            {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        )
        self.checkout = tmp / "git-gateway"
        self.home = tmp / "home"
        # The ports the docs name become free ones (2222 and 8080 in the checkout's config
        # too); `values` are other replacements (a database's real port).
        self.ports = {port: str(free_port()) for port in ("2222", "8080", *ports)}
        self.values = {**self.ports, **(values or {})}
        self.state = tmp / "shell-state"
        self.background: list[LiveProcess] = []
        self._copy_checkout()
        self._make_home()
        self.state.write_text(f"cd {shlex.quote(str(self.checkout))}\n")
        self._give(self.tmp)

    def _give(self, path: Path) -> None:
        """Everything under `path` to the walk's user, if it has one."""
        if self.user is None:
            return
        for directory, _, files in os.walk(path):
            os.chown(directory, *self.user)
            for name in files:
                os.chown(os.path.join(directory, name), *self.user, follow_symlinks=False)

    def _copy_checkout(self) -> None:
        """The repository's files as a clone would have them (uncommitted edits included)."""
        listed = run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            check=True,
        ).stdout
        for name in filter(None, listed.split("\0")):
            source = REPO_ROOT / name
            if source.is_file():
                target = self.checkout / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        config = self.checkout / "config" / "gateway.toml"
        text = config.read_text()
        for port in ("2222", "8080"):
            assert f'listen = "127.0.0.1:{port}"' in text, port
            text = text.replace(
                f'listen = "127.0.0.1:{port}"', f'listen = "127.0.0.1:{self.ports[port]}"'
            )
        config.write_text(text)

    def _make_home(self) -> None:
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True)
        ssh_dir.chmod(0o700)
        (ssh_dir / "config").write_text(
            f"UserKnownHostsFile {ssh_dir / 'known_hosts'}\n"
            f"IdentityFile {ssh_dir / 'id_ed25519'}\n"
            "IdentitiesOnly yes\nIdentityAgent none\nBatchMode yes\nConnectTimeout 20\n"
        )
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F "$HOME/.ssh/config" "$@"\n')
        wrapper.chmod(0o755)
        (self.home / ".gitconfig").write_text("[advice]\n\tdetachedHead = false\n")
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(self.home),
            "LC_ALL": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": str(self.home / ".gitconfig"),
            "GIT_AUTHOR_NAME": "Alice Example",
            "GIT_AUTHOR_EMAIL": "alice@example.com",
            "GIT_COMMITTER_NAME": "Alice Example",
            "GIT_COMMITTER_EMAIL": "alice@example.com",
        }

    def text(self, block: Block) -> str:
        return self.text_line(block.text)

    def run(self, block: Block, cwd: Path | None = None) -> str:
        """Run one block to its end; fail unless it exits 0 and prints what it shows."""
        script = self.tmp / "block.sh"
        start = f"cd {shlex.quote(str(cwd))}\n" if cwd else f". {shlex.quote(str(self.state))}\n"
        script.write_text(
            "set -euo pipefail\n" + start + self.text(block) + f"\n{{ printf 'cd %q\\n' "
            f'"$PWD"; export -p; }} > {shlex.quote(str(self.state))}\n'
        )
        self._give(script)
        result = subprocess.run(
            ["bash", str(script)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
            **self.credentials,  # type: ignore[arg-type]
        )
        output = result.stdout
        assert result.returncode == 0, f"{block.source} exited {result.returncode}:\n{output}"
        lines = output.splitlines()
        for expected in block.expected:
            wanted = pattern(self.text_line(expected))
            assert any(wanted.fullmatch(line.strip()) for line in lines), (
                f"{block.source}: no output line matches {expected!r}:\n{output}"
            )
        return output

    def text_line(self, line: str) -> str:
        for shown, real in self.values.items():
            line = line.replace(shown, real)
        return line

    def shim(self, name: str, script: str) -> None:
        """A command of the docs played by the test (`sudo -u postgres` on a server of its
        own): a script on PATH before the real one."""
        path = self.tmp / "bin" / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)

    def start(self, block: Block) -> LiveProcess:
        """Start a long-running block (a server) in the checkout; stopped by close()."""
        process = LiveProcess(
            ["bash", "-c", "set -euo pipefail\n" + self.text(block)],
            env=self.env,
            cwd=self.checkout,
            new_session=True,
            credentials=self.credentials,
        )
        self.background.append(process)
        return process

    def close(self) -> None:
        """SIGTERM every background block's process group, and wait for them to end."""
        for process in self.background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.proc.pid, signal.SIGTERM)
        for process in self.background:
            process.finish()
        self.background.clear()  # closing twice is closing once
