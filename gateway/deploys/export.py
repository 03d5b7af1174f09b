"""Export a pushed commit into a deploy's directory without the gateway holding the tree.

`git archive` (run by the gateway, the only one that can read the repository) writes a tar
stream; the gateway pumps it in small chunks, counting, into `tar -x` running inside the
deploy's sandbox, so hostile content is unpacked with the sandbox's rights only. The stream
is capped: a push of a tiny pack that inflates to gigabytes fails the deploy at the cap and
the gateway's memory does not move.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from .. import umask
from ..config import size_text
from ..errors import GatewayError
from ..git import gitbin
from .confine import Confinement
from .sandbox import APP_DIR, SANDBOX_PATH, Sandbox

CHUNK = 64 * 1024
STDERR_KEPT = 4096


class ExportError(GatewayError):
    """The tree could not be exported: one line for the deploy log and the pusher."""


def archive_env(repo: Path, quarantine: Path | None) -> dict[str, str]:
    """git's environment for reading the commit; in gate mode its objects are still in the
    push's quarantine, next to the repository's own."""
    extra: dict[str, str] = {}
    if quarantine is not None:
        extra["GIT_OBJECT_DIRECTORY"] = str(quarantine)
        extra["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = str(repo / "objects")
    return gitbin.environment(repo, None, **extra)


# Blobs bigger than this are streamed by git archive rather than read whole.
STREAM_THRESHOLD = "32m"


def archive_argv(git: str, sha: str, limit: int) -> list[str]:
    """`git archive` of one commit, run by the gateway outside any sandbox, so bounded: the
    repository's `info/attributes` (see repos.ATTRIBUTES) turns off every conversion of the
    pushed tree's `.gitattributes`, large blobs are streamed, and its memory is capped at
    what a tree within `limit` can need (a deltified blob is rebuilt in memory)."""
    argv = [
        git,
        "-c",
        f"core.bigFileThreshold={STREAM_THRESHOLD}",
        "archive",
        "--format=tar",
        sha,
    ]
    prlimit = shutil.which("prlimit")
    if prlimit is None:  # pragma: no cover - util-linux is on every supported host
        return argv
    return [prlimit, f"--data={2 * limit + 256 * 1024 * 1024}", "--core=0", "--", *argv]


async def export_commit(
    git: str,
    repo: Path,
    sha: str,
    dest: Path,
    *,
    sandbox: Sandbox,
    limit: int,
    quarantine: Path | None = None,
    confinement: Confinement | None = None,
) -> int:
    """Write the tree of commit `sha` into the empty directory `dest`; return the number of
    bytes of tar stream exported. Raises ExportError with a reason on any failure."""
    archive = await asyncio.create_subprocess_exec(
        *archive_argv(git, sha, limit),
        cwd=repo,
        env=archive_env(repo, quarantine),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        extract = await _start_extractor(sandbox, dest, confinement)
    except BaseException:
        await _kill(archive)
        raise
    try:
        return await _pump(archive, extract, limit)
    finally:
        await _kill(archive)
        await _kill(extract)


async def _start_extractor(
    sandbox: Sandbox, dest: Path, confinement: Confinement | None = None
) -> asyncio.subprocess.Process:
    # Ownership and modes from the archive are not applied; the tar comes from git objects
    # that passed fsck, and is unpacked with no more rights than the deploy itself.
    argv = ["tar", "-x", "--no-same-owner", "-f", "-", "-C"]
    streams: dict[str, Any] = {
        "stdin": asyncio.subprocess.PIPE,
        "stdout": asyncio.subprocess.DEVNULL,
        "stderr": asyncio.subprocess.PIPE,
    }
    operator_umask = umask.inherited()
    if operator_umask is not None:  # modes as `git archive | tar -x` gives the operator
        streams["umask"] = operator_umask
    if sandbox.enabled:
        return await sandbox.spawn(
            [*argv, APP_DIR],
            export_dir=dest,
            env={"PATH": SANDBOX_PATH, "LANG": "C.UTF-8"},
            network="none",
            confinement=confinement,
            **streams,
        )
    return await asyncio.create_subprocess_exec(
        *argv,
        str(dest),
        env={"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"},
        start_new_session=True,
        **streams,
    )


async def _pump(
    archive: asyncio.subprocess.Process, extract: asyncio.subprocess.Process, limit: int
) -> int:
    source, sink = archive.stdout, extract.stdin
    if source is None or sink is None or archive.stderr is None or extract.stderr is None:
        raise RuntimeError("export pipes missing")  # pragma: no cover - PIPE requested
    archive_err = asyncio.create_task(_tail(archive.stderr))
    extract_err = asyncio.create_task(_tail(extract.stderr))
    total = 0
    sink_broken = False
    try:
        while chunk := await source.read(CHUNK):
            total += len(chunk)
            if total > limit:
                raise ExportError(
                    f"the pushed tree is larger than this app's export limit "
                    f"({size_text(limit)}, [deploy] max_export_size): nothing deployed"
                )
            try:
                sink.write(chunk)
                await sink.drain()
            except (BrokenPipeError, ConnectionResetError):
                sink_broken = True
                break
        with contextlib.suppress(OSError):
            sink.close()
        archive_code = await archive.wait()
        extract_code = await extract.wait()
        if archive_code != 0:
            reason = (await archive_err).strip() or f"exit code {archive_code}"
            raise ExportError(f"cannot export the pushed commit: git archive: {reason}")
        if extract_code != 0 or sink_broken:
            reason = (await extract_err).strip() or f"exit code {extract_code}"
            raise ExportError(f"cannot unpack the pushed tree: {reason}")
        return total
    finally:
        for task in (archive_err, extract_err):
            task.cancel()


async def _tail(stream: asyncio.StreamReader) -> str:
    """The last line a process printed on stderr (reading all of it, keeping a little)."""
    kept = b""
    while chunk := await stream.read(CHUNK):
        kept = (kept + chunk)[-STDERR_KEPT:]
    lines = kept.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 10)
