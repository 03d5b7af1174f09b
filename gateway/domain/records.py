"""Deploy records as the registry keeps them: lists, one deploy with its webhook deliveries,
its log, and the cancel recorded when no gateway runs on this machine."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Conflict, NotFound, UsageError
from ..models import Deploy, DeployStatus, WebhookDelivery
from ..store import utcnow
from . import audit
from .deploylog import read_log
from .part import Part


@dataclass(frozen=True, slots=True)
class DeployRecord:
    deploy: Deploy
    deliveries: list[WebhookDelivery]


class DeployRecords(Part):
    """Reading deploys (running them is gateway.deploys'): the rules the CLI, API and SSH share."""

    async def list_deploys(self, app: str, limit: int = 20) -> list[Deploy]:
        if not 1 <= limit <= 1000:
            raise UsageError("limit must be between 1 and 1000")
        await self.domain.apps.get_app(app)
        return await self.store.list_deploys(app, limit=limit)

    async def get_deploy(self, deploy_id: int) -> Deploy:
        deploy = await self.store.get_deploy(deploy_id)
        if deploy is None:
            raise NotFound(f"no deploy #{deploy_id}")
        return deploy

    async def deploy_record(self, deploy_id: int) -> DeployRecord:
        deploy = await self.get_deploy(deploy_id)
        return DeployRecord(deploy, await self.store.webhook_deliveries(deploy.id))

    async def deploy_log(self, deploy_id: int) -> str:
        deploy = await self.get_deploy(deploy_id)
        return await read_log(self.store, deploy.id)

    async def record_cancel_offline(self, deploy_id: int, *, actor: str) -> Deploy:
        """Cancel a deploy with no gateway on this machine to ask: a queued one is cancelled
        in the registry; a running one is marked for the gateway running it (another node),
        or, if none runs it any more, recorded as cancelled."""
        deploy = await self.get_deploy(deploy_id)
        if deploy.status.finished:
            raise Conflict(f"deploy #{deploy.id} already ended: {deploy.status.value}")
        after = await self.store.request_cancel(deploy.id, f"cancelled by {actor}")
        if after is not None and after.status is DeployStatus.RUNNING:
            alive = {node.id for node in await self.store.list_nodes()}
            if after.runner not in alive:
                await self.store.finish_deploy(
                    deploy.id, DeployStatus.CANCELLED, utcnow(), reason=f"cancelled by {actor}"
                )
        await audit.record(
            self.store, "deploy_cancelled", actor=actor, app=deploy.app_name, deploy=deploy.id
        )
        return await self.get_deploy(deploy.id)
