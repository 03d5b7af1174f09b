"""Deploy records as the registry keeps them: lists, one deploy with its webhook deliveries,
and its log (cancelling is gateway.deploys', online or offline)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NotFound, UsageError
from ..models import Deploy, WebhookDelivery
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
