"""How a pipeline ended: the status it reports, with an exit code and a reason."""

from __future__ import annotations

from dataclasses import dataclass

from ..models import DeployStatus


@dataclass(frozen=True)
class Outcome:
    status: DeployStatus
    exit_code: int | None = None
    reason: str = ""
