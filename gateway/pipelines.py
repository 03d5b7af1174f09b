"""Deploy pipelines: run a command on the exported tree, or deliver a signed webhook."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .deploylog import DeployLog
from .models import DeployStatus

KILL_GRACE = 5.0
READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Outcome:
    status: DeployStatus
    exit_code: int | None = None
    reason: str = ""


async def run_command(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], log: DeployLog
) -> Outcome:
    """Run argv (no shell) in cwd with stdout and stderr merged into the log.

    Cancellation (timeout, cancel command, shutdown) kills the whole process group: a build
    tool's children must not outlive the deploy.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        log.write(f"cannot start the deploy command {argv[0]!r}: {exc.strerror or exc}\n")
        return Outcome(DeployStatus.FAILED, None, f"cannot start {argv[0]}: {exc.strerror or exc}")
    try:
        stdout = proc.stdout
        if stdout is None:  # pragma: no cover - PIPE requested
            raise RuntimeError("no stdout pipe")
        while chunk := await stdout.read(READ_CHUNK):
            log.write_bytes(chunk)
        code = await proc.wait()
    except BaseException:
        await kill_group(proc)
        raise
    if code == 0:
        return Outcome(DeployStatus.SUCCEEDED, 0)
    if code < 0:
        return Outcome(DeployStatus.FAILED, code, f"killed by signal {-code}")
    return Outcome(DeployStatus.FAILED, code, f"exit code {code}")


async def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
            break
        except TimeoutError:
            continue
    # Children that ignored SIGTERM and left the group leader: SIGKILL what is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
