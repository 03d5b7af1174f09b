"""git's wire protocol written by hand for the integration tests: pkt-lines, a pack made by
`git pack-objects` (run with a timeout, in a thread), and a v0 push through receive-pack."""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from tests.integration.conftest import TIMEOUT, LiveGateway, Person

ZERO = "0" * 40
FLUSH = b"0000"
DELIM = b"0001"


def pkt(line: str | bytes) -> bytes:
    data = line.encode() if isinstance(line, str) else line
    return b"%04x" % (len(data) + 4) + data


async def read_pkts(stream: asyncssh.SSHReader[bytes]) -> list[bytes]:
    """pkt-lines up to the next flush (which is not returned); a delimiter reads as b""."""
    lines: list[bytes] = []
    while True:
        size = int(await asyncio.wait_for(stream.readexactly(4), TIMEOUT), 16)
        if size == 0:
            return lines
        lines.append(b"" if size == 1 else await stream.readexactly(size - 4))


def git(*args: str, cwd: Path, stdin: bytes = b"") -> bytes:
    """Run git with a timeout and no user or system configuration; its stdout."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "A",
        "GIT_AUTHOR_EMAIL": "a@example.com",
        "GIT_COMMITTER_NAME": "C",
        "GIT_COMMITTER_EMAIL": "c@example.com",
        "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
    }
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, input=stdin, capture_output=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def commit_and_pack(directory: Path, files: dict[str, str]) -> tuple[str, bytes]:
    """A one-commit repository with these files: the commit's id and a pack of it."""
    directory.mkdir()
    git("init", "-q", "-b", "main", ".", cwd=directory)
    for name, text in files.items():
        (directory / name).write_text(text)
    git("add", "-A", cwd=directory)
    git("commit", "-q", "-m", "first", cwd=directory)
    sha = git("rev-parse", "HEAD", cwd=directory).decode().strip()
    pack = git("pack-objects", "--stdout", "--revs", "-q", cwd=directory, stdin=b"main\n")
    return sha, pack


def server_refs(repo: Path) -> dict[str, str]:
    out = git("for-each-ref", "--format=%(refname) %(objectname)", cwd=repo).decode()
    return dict(line.split(" ", 1) for line in out.splitlines())


async def session(gw: LiveGateway, person: Person, command: str, **env: str) -> Any:
    conn = await gw.connect(person.key)
    process = await conn.create_process(command, env=env or None, encoding=None)
    return conn, process


@dataclass
class Pushed:
    """What receive-pack answered: its report-status lines, exit status and stderr."""

    report: list[bytes]
    code: int | None
    stderr: str


async def push(gw: LiveGateway, person: Person, app: str, sha: str, pack: bytes) -> Pushed:
    """Push `sha` as refs/heads/main (a new branch) with receive-pack's v0 protocol."""
    conn, process = await session(gw, person, f"git-receive-pack '{app}.git'")
    async with conn:
        advertised = await read_pkts(process.stdout)
        assert advertised[0].startswith(f"{ZERO} capabilities^{{}}\0".encode())
        process.stdin.write(pkt(f"{ZERO} {sha} refs/heads/main\0report-status\n") + FLUSH)
        process.stdin.write(pack)
        process.stdin.write_eof()
        report = await read_pkts(process.stdout)
        stderr = await asyncio.wait_for(process.stderr.read(), TIMEOUT)
        await asyncio.wait_for(process.wait_closed(), TIMEOUT)
    return Pushed(report, process.exit_status, stderr.decode())
