"""What pushers and operators read about a deploy: states, durations, the next command."""

from __future__ import annotations

from ..config import Config
from ..models import Deploy, DeployStatus


def short(sha: str) -> str:
    return sha[:8]


def duration_text(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def describe(deploy: Deploy, elapsed: float | None = None) -> str:
    status = deploy.status
    took = f" in {duration_text(elapsed)}" if elapsed is not None else ""
    if status is DeployStatus.SUCCEEDED:
        return f"succeeded{took}"
    if status is DeployStatus.FAILED:
        return f"FAILED ({deploy.reason or 'failed'}){took}"
    if status is DeployStatus.TIMED_OUT:
        return f"TIMED OUT ({deploy.reason}; killed)"
    return f"{status.value.upper()} ({deploy.reason})" if deploy.reason else status.value.upper()


def logs_command(config: Config, app: str, deploy_id: int, follow: bool = False) -> str:
    return config.ssh_command(f"logs {app} {deploy_id}" + (" --follow" if follow else ""))


def final_line(config: Config, deploy: Deploy, elapsed: float | None = None) -> str:
    text = f"deploy #{deploy.id} {describe(deploy, elapsed)}."
    if not deploy.status.ok:
        text += " The push itself is stored."
    return f"{text} Log: {logs_command(config, deploy.app_name, deploy.id)}\n"
