"""Deploys: verified push sessions, the shared queue, pipelines (command, webhook), logs."""

from .outcome import Outcome
from .pushes import Peer, PushSession, RefUpdate
from .queue import Job
from .service import DeployService, cancel_offline

__all__ = ["DeployService", "Job", "Outcome", "Peer", "PushSession", "RefUpdate", "cancel_offline"]
