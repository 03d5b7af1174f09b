"""Webhook receivers' status reports: where they call back, what they may write, and the
outcome a deploy waiting on a receiver reads back from the registry."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from ..config import Config
from ..models import DeployStatus
from ..store import Store
from .outcome import Outcome
from .queue import Job, Wakeups

# A receiver's report text for a deploy that runs in another process: at most this many
# characters (the tail) per report, this many reports per second and deploy.
REPORT_TEXT = 16 * 1024
REPORTS_PER_SECOND = 5.0


class Pace:
    """At most `rate` events per second per key, bursts of that size (a token bucket)."""

    def __init__(self, rate: float, keys: int = 1000) -> None:
        self.rate = rate
        self.keys = keys
        self._buckets: dict[int, tuple[float, float]] = {}

    def allow(self, key: int) -> bool:
        now = time.monotonic()
        tokens, then = self._buckets.get(key, (self.rate, now))
        tokens = min(self.rate, tokens + (now - then) * self.rate)
        if tokens < 1:
            return False
        if len(self._buckets) >= self.keys and key not in self._buckets:
            self._buckets.clear()  # bounded: forgetting old deploys' buckets is harmless
        self._buckets[key] = (tokens - 1, now)
        return True


class Reports:
    """Receivers' reports, for the deploys of every process: the ones running here get the
    text in their own log, the others' is appended to the registry (paced)."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        wakeups: Wakeups,
        jobs: Mapping[int, Job],
        poll_interval: Callable[[], float],
    ) -> None:
        self.config = config
        self.store = store
        self.wakeups = wakeups
        self.jobs = jobs  # the deploys this process runs (the runner's)
        self.poll_interval = poll_interval
        self.http_address: tuple[str, int] | None = None  # set when the HTTP endpoint listens
        self._pace = Pace(REPORTS_PER_SECOND)

    def status_base_url(self) -> str | None:
        config = self.config()
        if config.http.public_url:
            return config.http.public_url.rstrip("/")
        if self.http_address is None:
            return None
        host, port = self.http_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def wait_for_report(self, deploy_id: int) -> Outcome:
        """A receiver's report reaches whichever gateway it calls: it is read back from the
        registry."""
        while True:
            found = await self.store.deploy_report(deploy_id)
            if found is not None:
                status, exit_code = found
                return Outcome(status, exit_code, f"reported {status.value} by the receiver")
            await self.wakeups.wait(deploy_id, self.poll_interval())

    async def report(
        self, deploy_id: int, text: str | None, status: DeployStatus | None, exit_code: int | None
    ) -> str:
        """A receiver's report: log lines, and possibly the final status. "ok", "not
        waiting" (the deploy waits for no report) or "slow down" (paced)."""
        deploy = await self.store.get_deploy(deploy_id)
        if deploy is None or deploy.status is not DeployStatus.RUNNING:
            return "not waiting"
        if await self.store.deploy_report(deploy_id) is not None:
            return "not waiting"
        if text:
            text = text if text.endswith("\n") else text + "\n"
            job = self.jobs.get(deploy_id)
            if job is not None:
                job.log.write(text)  # bounded and paced like the deploy's own output
            elif not self._pace.allow(deploy_id):
                return "slow down"
            else:
                await self.store.append_deploy_log(
                    deploy_id, text[-REPORT_TEXT:], keep=self.config().deploy.log_limit
                )
        if status is not None and not await self.store.report_deploy(deploy_id, status, exit_code):
            return "not waiting"
        return "ok"
