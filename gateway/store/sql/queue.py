"""The shared deploy queue, in SQL: queueing (superseding what waits), claims within each
node's limit, cancel requests, receivers' reports, deploy logs and the nodes' leases."""

# Statements are built from the code's own constants and the models' field names, never
# from input: values always go as parameters.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ...models import Deploy, DeployStatus, LogChunk, NewDeploy, Node
from .. import Queued, rows, storable, utcnow
from .base import UniqueViolation
from .deploys import BY_ID, BY_IDS, DeploysSQL, deploy

SUPERSEDE = """UPDATE deploys SET status = 'cancelled', finished_at = $1, reason = $2,
                      superseded_by = $3
                WHERE app_id = $4 AND status = 'queued' AND id < $3
               RETURNING id"""
STATS = "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM deploys WHERE status = 'queued'"
ANY_QUEUED = "SELECT 1 AS found FROM deploys WHERE status = 'queued' LIMIT 1"
NODE_EXISTS = "SELECT 1 AS found FROM nodes WHERE id = $1"
BUSY = """SELECT COUNT(*) AS n FROM deploys d JOIN nodes n ON n.id = d.runner
           WHERE d.status = 'running' AND n.name = $1"""
# The oldest deploy the node may take ($1: the node; $2: the ids it is limited to). Other
# nodes skip what one of them is taking (where rows lock); the unique index on running
# deploys per app settles two claims of one app's deploys.
# A deploy of an app whose repository has a home node runs on that machine (its name): only
# its filesystem cache reads that repository (see docs/cluster.md).
CANDIDATE = """SELECT d.id FROM deploys d
                WHERE d.status = 'queued' AND (d.mode <> 'gate' OR d.origin = $1) {only}
                  AND NOT EXISTS (SELECT 1 FROM deploys r
                                   WHERE r.app_id = d.app_id AND r.status = 'running')
                  AND NOT EXISTS (SELECT 1 FROM app_homes h JOIN nodes hn ON hn.id = h.node
                                   WHERE h.app_id = d.app_id AND hn.name <> {name})
                ORDER BY d.id LIMIT 1 {{skip:d}}"""
CANDIDATE_ANY = CANDIDATE.format(only="", name="$2")
CANDIDATE_ONLY = CANDIDATE.format(only="AND d.id {ids:$2}", name="$3")
TAKE = """UPDATE deploys SET status = 'running', started_at = $1, runner = $2
           WHERE id = $3 AND status = 'queued'"""
CANCEL_QUEUED = """UPDATE deploys SET status = 'cancelled', finished_at = $1, reason = $2
                    WHERE id = $3 AND status = 'queued'"""
CANCEL_RUNNING = """UPDATE deploys SET cancel_request = $1
                     WHERE id = $2 AND status = 'running' AND cancel_request IS NULL"""
CANCEL_REQUESTS = """SELECT id, cancel_request FROM deploys
                      WHERE status = 'running' AND runner = $1 AND cancel_request IS NOT NULL"""
REPORT = """UPDATE deploys SET report_status = $1, report_exit_code = $2
             WHERE id = $3 AND status = 'running' AND report_status IS NULL"""
REPORTED = "SELECT report_status, report_exit_code FROM deploys WHERE id = $1"
# The row's update orders concurrent appends to one deploy (runner, status reports).
LOG_NEXT = """UPDATE deploys SET log_seq = log_seq + 1, log_bytes = log_bytes + $1
               WHERE id = $2 RETURNING log_seq, log_bytes"""
LOG_ADD = """INSERT INTO deploy_log_chunks (deploy_id, seq, position, size, closing, text)
             VALUES ($1, $2, $3, $4, $5, $6)"""
# Whole chunks that end before the kept tail go; the newest always stays.
LOG_TRIM = """DELETE FROM deploy_log_chunks
               WHERE deploy_id = $1 AND seq < $2 AND position + size <= $3"""
LOG = f"""SELECT {rows.select_list(LogChunk, "c")} FROM deploy_log_chunks c
           WHERE c.deploy_id = $1 AND c.seq > $2 ORDER BY c.seq LIMIT $3"""
REGISTER = """INSERT INTO nodes (id, name, pid, started_at, seen_at, address)
              VALUES ($1, $2, $3, $4, {clock}, $5)
              ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at"""
RENEW = "UPDATE nodes SET seen_at = {clock} WHERE id = $1"
EXPIRE = "DELETE FROM nodes WHERE {stale}"
INTERRUPT = """UPDATE deploys SET status = 'interrupted', finished_at = $1,
                      reason = CASE status WHEN 'running'
                          THEN 'the gateway running it stopped answering'
                          ELSE 'the gated push was lost with the gateway holding it' END
                WHERE (status = 'running'
                       AND (runner IS NULL OR runner NOT IN (SELECT id FROM nodes)))
                   OR (status = 'queued' AND mode = 'gate'
                       AND (origin IS NULL OR origin NOT IN (SELECT id FROM nodes)))
               RETURNING id"""
LEAVE = "DELETE FROM nodes WHERE id = $1"
NODES = f"SELECT {rows.select_list(Node, 'n')} FROM nodes n ORDER BY n.id"


class QueueSQL(DeploysSQL):
    async def queue_deploy(self, new: NewDeploy, *, origin: str | None = None) -> Queued:
        async with self._transaction():
            now = utcnow()
            deploy_id = await self._insert_deploy(new, now, origin)
            # Rows locked (where rows lock): a claim cannot take one being superseded.
            found = await self.fetch(
                SUPERSEDE,
                self.dialect.time(now),
                f"superseded by #{deploy_id}",
                deploy_id,
                new.app_id,
            )
            superseded = sorted(int(r["id"]) for r in found)
            for older in superseded:
                await self.notify("done", older)
            await self.notify("queue", deploy_id)
            row = await self.fetchrow(BY_ID, deploy_id)
        for older in superseded:
            self._announce("done", older)
        self._announce("queue", deploy_id)
        assert row is not None  # noqa: S101 - read in the transaction that added it
        return Queued(deploy(row), superseded)

    async def queue_stats(self) -> tuple[int, datetime | None]:
        row = await self.fetchrow(STATS)
        assert row is not None  # noqa: S101 - an aggregate has its row
        return int(row["n"]), rows.moment(row["oldest"])

    async def claim_deploy(
        self,
        node: str,
        node_name: str,
        max_parallel: int,
        only: Sequence[int] | None = None,
    ) -> Deploy | None:
        # Idle gateways look often: a plain read first, a transaction only when there is work.
        if await self.fetchrow(ANY_QUEUED) is None:
            return None
        try:
            async with self._transaction():
                await self.lock_claims(node_name)
                if await self.fetchrow(NODE_EXISTS, node) is None:
                    return None  # declared gone: it runs nothing until it has joined again
                if int(await self.fetchval(BUSY, node_name)) >= max_parallel:
                    return None
                if only is None:
                    deploy_id = await self.fetchval(CANDIDATE_ANY, node, node_name)
                else:
                    ids = self.dialect.array([int(i) for i in only])
                    deploy_id = await self.fetchval(CANDIDATE_ONLY, node, ids, node_name)
                if deploy_id is None:
                    return None
                await self.execute(TAKE, self.dialect.time(utcnow()), node, deploy_id)
                return await self.get_deploy(int(deploy_id))
        except UniqueViolation:
            return None  # another node started one of this app's deploys first

    async def request_cancel(self, deploy_id: int, reason: str) -> Deploy | None:
        kind = ""
        async with self._transaction():
            if await self.execute(CANCEL_QUEUED, self.dialect.time(utcnow()), reason, deploy_id):
                kind = "done"
            elif await self.execute(CANCEL_RUNNING, reason, deploy_id):
                kind = "cancel"
            if kind:
                await self.notify(kind, deploy_id)
            found = await self.get_deploy(deploy_id)
        if kind:
            self._announce(kind, deploy_id)
        return found

    async def cancel_requests(self, node: str) -> list[tuple[int, str]]:
        found = await self.fetch(CANCEL_REQUESTS, node)
        return [(int(r["id"]), str(r["cancel_request"])) for r in found]

    async def report_deploy(
        self, deploy_id: int, status: DeployStatus, exit_code: int | None
    ) -> bool:
        async with self._transaction():
            done = await self.execute(REPORT, status.value, exit_code, deploy_id) == 1
            if done:
                await self.notify("report", deploy_id)
        if done:
            self._announce("report", deploy_id)
        return done

    async def deploy_report(self, deploy_id: int) -> tuple[DeployStatus, int | None] | None:
        row = await self.fetchrow(REPORTED, deploy_id)
        if row is None or row["report_status"] is None:
            return None
        code = row["report_exit_code"]
        return DeployStatus(row["report_status"]), None if code is None else int(code)

    # -- logs --

    async def append_deploy_log(
        self, deploy_id: int, text: str, *, skipped: int = 0, closing: bool = False, keep: int
    ) -> int | None:
        text = storable(text)
        size = len(text.encode())
        async with self._transaction():
            row = await self.fetchrow(LOG_NEXT, skipped + size, deploy_id)
            if row is None:
                return None
            seq, end = int(row["log_seq"]), int(row["log_bytes"])
            await self.execute(LOG_ADD, deploy_id, seq, end - size, size, int(closing), text)
            await self.execute(LOG_TRIM, deploy_id, seq, end - keep)
            await self.notify("log", deploy_id)
        self._announce("log", deploy_id)
        return seq

    async def deploy_log(self, deploy_id: int, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        return [rows.record(LogChunk, r) for r in await self.fetch(LOG, deploy_id, after, limit)]

    # -- the processes sharing the queue --

    async def register_node(
        self, node: str, name: str, pid: int, address: str | None = None
    ) -> None:
        async with self._transaction():
            await self.execute(REGISTER, node, name, pid, self.dialect.time(utcnow()), address)

    async def renew_node(self, node: str) -> bool:
        async with self._transaction():
            return await self.execute(RENEW, node) == 1

    async def expire_nodes(self, lapse: float) -> list[Deploy]:
        async with self._transaction():
            await self.execute(EXPIRE, float(lapse))
            found = await self.fetch(INTERRUPT, self.dialect.time(utcnow()))
            ids = sorted(int(r["id"]) for r in found)
            for deploy_id in ids:
                await self.notify("done", deploy_id)
            if ids:
                await self.notify("queue")
            gone = await self._deploys(BY_IDS, self.dialect.array(ids))
        for deploy_id in ids:
            self._announce("done", deploy_id)
        if ids:
            self._announce("queue")
        return gone

    async def leave_node(self, node: str) -> None:
        async with self._transaction():
            await self.execute(LEAVE, node)

    async def list_nodes(self) -> list[Node]:
        return [rows.record(Node, r) for r in await self.fetch(NODES)]
