"""The command pipeline: export the pushed commit, run the deploy command on it, sandboxed
([deploy] command; the sandbox pieces are gateway/deploys/sandbox.py and its neighbours)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import executors, umask
from ...config import Config, DeploySettings, size_text
from ...domain.deploylog import DeployLog
from ...logs import q
from ...models import Deploy, DeployStatus
from .. import program
from ..builddir import SandboxError, remove_tree
from ..confine import Confinement
from ..export import ExportError, export_commit
from ..outcome import Outcome
from ..queue import Job
from ..sandbox import (
    APP_DIR,
    SANDBOX_PATH,
    Sandbox,
    network_stopped,
)
from .base import Context

log = logging.getLogger("gateway.deploys")

KILL_GRACE = 5.0
READ_CHUNK = 64 * 1024


class CommandPipeline:
    """[deploy] command: the argument list runs on an export of the pushed commit."""

    kind = "command"

    def configured(self, settings: DeploySettings) -> bool:
        return bool(settings.command)

    async def run(self, job: Job, context: Context) -> Outcome:
        deploy, settings = job.deploy, job.settings
        try:
            sandbox = Sandbox.of(settings)
        except SandboxError as exc:
            log.error("event=deploy_sandbox_unavailable deploy=%d reason=%s", deploy.id, q(exc))
            context.log.write("the deploy sandbox is not available: see the gateway's log\n")
            return Outcome(DeployStatus.FAILED, None, "deploy sandbox unavailable")
        build_dir = context.config.deploy.build_dir
        if build_dir is None:  # pragma: no cover - config.from_mapping resolves it
            raise RuntimeError("[deploy] build_dir was not resolved")
        return await run_pipeline(
            settings.command,
            deploy,
            git=context.git,
            repo=context.repos.path_for(deploy.app_name),
            quarantine=job.quarantine,
            sandbox=sandbox,
            build_dir=build_dir,
            max_export_size=settings.max_export_size,
            max_output=settings.max_output,
            log=context.log,
            setting=command_setting(context.config, deploy.app_name),
        )

    async def close(self) -> None:
        pass


PIPELINE = CommandPipeline()


def command_setting(config: Config, app: str) -> str:
    """Where the app's deploy command is configured, as the operator would look for it."""
    overridden = "command" in (config.apps.get(app) or {})
    return f"[apps.{app}] command" if overridden else "[deploy] command"


def command_env(deploy: Deploy, home: str, path: str) -> dict[str, str]:
    """The deploy command's whole environment: what the deploy is, nothing from the pusher's
    session, and nothing of the gateway's (no socket, token or repository path)."""
    return {
        "PATH": path,
        "HOME": home,
        "LANG": "C.UTF-8",
        "GATEWAY_APP": deploy.app_name,
        "GATEWAY_REF": deploy.ref,
        "GATEWAY_OLD_SHA": deploy.old_sha,
        "GATEWAY_NEW_SHA": deploy.new_sha,
        "GATEWAY_USER": deploy.pusher,
        "GATEWAY_KEY_FINGERPRINT": deploy.key_fingerprint,
        "GATEWAY_DEPLOY_ID": str(deploy.id),
        # The pusher's `-o deploy.note=...` (validated: printable, one line), or empty.
        "GATEWAY_DEPLOY_NOTE": deploy.note or "",
    }


async def run_pipeline(
    argv: Sequence[str],
    deploy: Deploy,
    *,
    git: str,
    repo: Path,
    quarantine: Path | None,
    sandbox: Sandbox,
    build_dir: Path,
    max_export_size: int,
    max_output: int,
    log: DeployLog,
    setting: str = "[deploy] command",
) -> Outcome:
    """Export the commit into a fresh directory, run argv there, remove the directory.
    `setting` names where argv is configured, for the line saying its program is missing."""
    workdir = await executors.run(_make_workdir, build_dir, deploy.id, sandbox)
    confinement = None
    try:
        if sandbox.enabled:
            confinement = await Confinement.start(deploy.id, workdir, sandbox.limits)
        try:
            await export_commit(
                git,
                repo,
                deploy.new_sha,
                workdir,
                sandbox=sandbox,
                limit=max_export_size,
                quarantine=quarantine,
                confinement=confinement,
            )
        except ExportError as exc:
            if stopped := await _stopped(confinement, log):
                return stopped
            log.write(f"{exc}\n")
            return Outcome(DeployStatus.FAILED, None, str(exc))
        # The export alone may take more than max_build_size on disk (small files take a
        # block each): measured now, before anything of the push runs.
        if stopped := await _stopped(confinement, log, final=False):
            return stopped
        refused = await _check_program(argv[0], deploy, workdir, setting, log)
        if refused is not None:
            return refused
        if sandbox.enabled:
            env = command_env(deploy, APP_DIR, SANDBOX_PATH)
            outcome = await run_command(
                argv,
                log,
                max_output,
                sandbox=sandbox,
                export_dir=workdir,
                env=env,
                confinement=confinement,
            )
            return await _stopped(confinement, log) or outcome
        env = command_env(deploy, str(workdir), os.environ.get("PATH", os.defpath))
        return await run_command(argv, log, max_output, cwd=workdir, env=env)
    finally:
        if confinement is not None:
            await confinement.close()
        await executors.run(remove_tree, workdir)


async def _stopped(
    confinement: Confinement | None, log: DeployLog, *, final: bool = True
) -> Outcome | None:
    """The failed outcome of a deploy its confinement stopped (build size, out of memory);
    `final`: the deploy's processes are over (else the watcher goes on)."""
    if confinement is None:
        return None
    reason = await (confinement.stopped() if final else confinement.watch.check())
    if not reason:
        return None
    log.write(f"\ndeploy stopped: {reason}\n")
    return Outcome(DeployStatus.FAILED, None, reason)


async def _check_program(
    name: str, deploy: Deploy, workdir: Path, setting: str, log: DeployLog
) -> Outcome | None:
    """A failed outcome, with the line the pusher reads, when the command's program comes
    from the pushed tree and is not there or cannot run (rather than bwrap's execvp error)."""
    kind = await executors.run(program.problem, workdir, name)
    if kind is None:
        return None
    line = program.explain(name, kind, deploy.branch, deploy.new_sha, setting)
    log.write(f"{line}\n")
    short = "not executable" if kind == program.NOT_EXECUTABLE else "not found"
    return Outcome(DeployStatus.FAILED, None, f"{name} {short} in the pushed tree")


def _make_workdir(build_dir: Path, deploy_id: int, sandbox: Sandbox) -> Path:
    sandbox.prepare_build_dir(build_dir)
    path = Path(tempfile.mkdtemp(prefix=f"deploy-{deploy_id}-", dir=build_dir))
    sandbox.prepare_dir(path)
    return path


async def run_command(
    argv: Sequence[str],
    log: DeployLog,
    max_output: int,
    *,
    env: Mapping[str, str],
    sandbox: Sandbox | None = None,
    export_dir: Path | None = None,
    cwd: Path | None = None,
    confinement: Confinement | None = None,
) -> Outcome:
    """Run argv (no shell) with stdout and stderr merged into the log.

    Cancellation (timeout, cancel command, shutdown) kills the whole process group: a build
    tool's children must not outlive the deploy. Output beyond `max_output` stops it too.
    """
    streams: dict[str, Any] = {
        "stdin": asyncio.subprocess.DEVNULL,
        "stdout": asyncio.subprocess.PIPE,
        "stderr": asyncio.subprocess.STDOUT,
    }
    operator_umask = umask.inherited()
    if operator_umask is not None:
        # The gateway keeps its own files private (umask 077); what a deploy writes for
        # others (a shared cache, a web root) follows the umask the operator started it with.
        streams["umask"] = operator_umask
    try:
        if sandbox is not None and export_dir is not None:
            proc = await sandbox.spawn(
                argv, export_dir=export_dir, env=env, confinement=confinement, **streams
            )
        else:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=dict(env), start_new_session=True, **streams
            )
    except SandboxError as exc:  # pasta could not give an isolated deploy its network
        reason = str(exc)
        log.write(f"{reason}\n")
        return Outcome(DeployStatus.FAILED, None, reason)
    except OSError as exc:
        reason = f"cannot start {argv[0]}: {exc.strerror or exc}"
        log.write(f"{reason}\n")
        return Outcome(DeployStatus.FAILED, None, reason)
    printed = 0
    try:
        stdout = proc.stdout
        if stdout is None:  # pragma: no cover - PIPE requested
            raise RuntimeError("no stdout pipe")
        while chunk := await stdout.read(READ_CHUNK):
            printed += len(chunk)
            if printed > max_output:
                await kill_group(proc)
                reason = f"output limit exceeded ({size_text(max_output)}, [deploy] max_output)"
                log.write(f"\n{reason}: stopped\n")
                return Outcome(DeployStatus.FAILED, None, reason)
            log.write_bytes(chunk)
        code = await proc.wait()
    except BaseException:
        await kill_group(proc)
        raise
    finally:
        await network_stopped(proc)
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
