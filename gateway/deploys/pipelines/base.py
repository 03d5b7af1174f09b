"""What every deploy pipeline is: the `Pipeline` protocol, and the narrow `Context` a run gets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ...config import Config, DeploySettings
from ...domain.deploylog import DeployLog
from ...git.repos import Repositories
from ...metrics import Metrics
from ...models import WebhookDelivery
from ..outcome import Outcome
from ..queue import Job


class Records(Protocol):
    """The registry writes a pipeline may make about its own deploy (and nothing else)."""

    async def set_status_token(self, deploy_id: int, token_hash: str) -> None: ...

    async def add_webhook_delivery(self, delivery: WebhookDelivery) -> None: ...


@dataclass(frozen=True)
class Context:
    """What one run may use: never the deploy service itself, so a pipeline cannot reach the
    queue, the leases or other deploys. Cancellation (a cancel, the timeout, a fenced or
    stopping gateway) arrives as asyncio cancellation of `run`: clean up, then let it raise."""

    log: DeployLog  # the deploy's log (bounded, flushed to the registry)
    config: Config  # the gateway's settings when the deploy started
    repos: Repositories  # the app's repository: exports, commit lists
    git: str  # the git binary
    records: Records
    metrics: Metrics | None
    status_base_url: str | None  # where receivers report back (None: no HTTP endpoint)
    wait_for_report: Callable[[], Awaitable[Outcome]]  # a receiver's report, once it comes


class Pipeline(Protocol):
    """One kind of deploy pipeline. `kind` is the name recorded with each deploy; the app's
    deploy settings choose the kind whose `configured` says yes (the configuration allows one)."""

    kind: str

    def configured(self, settings: DeploySettings) -> bool:
        """Whether these deploy settings ask for this kind."""
        ...

    async def run(self, job: Job, context: Context) -> Outcome:
        """Deploy job.deploy (its commit, maybe still in job.quarantine) as job.settings say."""
        ...

    async def close(self) -> None:
        """Release what runs shared (a client session): the gateway stops."""
        ...
