"""Deploys: verified push sessions, queues, sandboxed command pipelines, webhooks, logs."""

from .outcome import Outcome
from .pushes import Peer, PushSession, RefUpdate
from .queue import Job
from .service import DeployService, pipeline_kind

__all__ = ["DeployService", "Job", "Outcome", "Peer", "PushSession", "RefUpdate", "pipeline_kind"]
