"""The memory store's deploy queue: queueing (superseding what waits), claims within each
node's limit, cancel requests, receivers' reports, deploy logs and the nodes' leases."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime

from ...models import Deploy, DeployStatus, LogChunk, NewDeploy, Node
from .. import Queued, rows, storable, utcnow
from .deploys import DeploysMemory


def clock() -> float:
    """The leases' clock: this process's, never stepped (the memory is never shared with
    another process)."""
    return time.monotonic()


class QueueMemory(DeploysMemory):
    async def queue_deploy(self, new: NewDeploy, *, origin: str | None = None) -> Queued:
        async with self._transaction():
            now = utcnow()
            deploy_id = self._insert_deploy(new, now, origin)
            superseded = sorted(
                row["id"]
                for row in self._db.deploys.values()
                if row["app_id"] == new.app_id
                and row["status"] == "queued"
                and row["id"] < deploy_id
            )
            for older in superseded:
                self._db.deploys[older].update(
                    status="cancelled",
                    finished_at=now,
                    reason=f"superseded by #{deploy_id}",
                    superseded_by=deploy_id,
                )
            deploy = self._deploy(self._db.deploys[deploy_id])
        for older in superseded:
            self._announce("done", older)
        self._announce("queue", deploy_id)
        return Queued(deploy, superseded)

    async def queue_stats(self) -> tuple[int, datetime | None]:
        async with self._reading() as db:
            waiting = [r["created_at"] for r in db.deploys.values() if r["status"] == "queued"]
            return len(waiting), min(waiting, default=None)

    async def claim_deploy(
        self,
        node: str,
        node_name: str,
        max_parallel: int,
        only: Sequence[int] | None = None,
    ) -> Deploy | None:
        async with self._transaction():
            db = self._db
            if node not in db.nodes:
                return None  # declared gone: it runs nothing until it has joined again
            running = [r for r in db.deploys.values() if r["status"] == "running"]
            busy = sum(
                1
                for r in running
                if r["runner"] in db.nodes and db.nodes[r["runner"]]["name"] == node_name
            )
            if busy >= max_parallel:
                return None
            apps_running = {r["app_id"] for r in running}
            # An app with a home node elsewhere is deployed there (see the SQL store).
            homed_elsewhere = {
                app_id
                for app_id, home in db.homes.items()
                if db.nodes[home["node"]]["name"] != node_name
            }
            wanted = None if only is None else set(only)
            for deploy_id in sorted(db.deploys):
                row = db.deploys[deploy_id]
                if (
                    row["status"] == "queued"
                    and (row["mode"] != "gate" or row["origin"] == node)
                    and (wanted is None or deploy_id in wanted)
                    and row["app_id"] not in apps_running
                    and row["app_id"] not in homed_elsewhere
                ):
                    row.update(status="running", started_at=utcnow(), runner=node)
                    return self._deploy(row)
            return None

    async def request_cancel(self, deploy_id: int, reason: str) -> Deploy | None:
        kind = ""
        async with self._transaction():
            row = self._db.deploys.get(deploy_id)
            if row is None:
                return None
            if row["status"] == "queued":
                row.update(status="cancelled", finished_at=utcnow(), reason=reason)
                kind = "done"
            elif row["status"] == "running" and row["cancel_request"] is None:
                row["cancel_request"] = reason
                kind = "cancel"
            deploy = self._deploy(row)
        if kind:
            self._announce(kind, deploy_id)
        return deploy

    async def cancel_requests(self, node: str) -> list[tuple[int, str]]:
        async with self._reading() as db:
            return [
                (deploy_id, row["cancel_request"])
                for deploy_id, row in sorted(db.deploys.items())
                if row["status"] == "running"
                and row["runner"] == node
                and row["cancel_request"] is not None
            ]

    async def report_deploy(
        self, deploy_id: int, status: DeployStatus, exit_code: int | None
    ) -> bool:
        async with self._transaction():
            row = self._db.deploys.get(deploy_id)
            if row is None or row["status"] != "running" or row["report_status"] is not None:
                return False
            row.update(report_status=status.value, report_exit_code=exit_code)
        self._announce("report", deploy_id)
        return True

    async def deploy_report(self, deploy_id: int) -> tuple[DeployStatus, int | None] | None:
        async with self._reading() as db:
            row = db.deploys.get(deploy_id)
            if row is None or row["report_status"] is None:
                return None
            return DeployStatus(row["report_status"]), row["report_exit_code"]

    # -- logs --

    async def append_deploy_log(
        self, deploy_id: int, text: str, *, skipped: int = 0, closing: bool = False, keep: int
    ) -> int | None:
        text = storable(text)
        size = len(text.encode())
        async with self._transaction():
            db = self._db
            row = db.deploys.get(deploy_id)
            if row is None:
                return None
            seq, end = int(row["log_seq"]) + 1, int(row["log_bytes"]) + skipped + size
            row.update(log_seq=seq, log_bytes=end)
            db.chunks[(deploy_id, seq)] = {
                "seq": seq,
                "position": end - size,
                "size": size,
                "closing": closing,
                "text": text,
            }
            # Whole chunks that end before the kept tail go; the newest always stays.
            for key, chunk in list(db.chunks.items()):
                ends = chunk["position"] + chunk["size"]
                if key[0] == deploy_id and key[1] < seq and ends <= end - keep:
                    del db.chunks[key]
        self._announce("log", deploy_id)
        return seq

    async def deploy_log(self, deploy_id: int, after: int = 0, limit: int = 1000) -> list[LogChunk]:
        async with self._reading() as db:
            seqs = sorted(s for d, s in db.chunks if d == deploy_id and s > after)[:limit]
            return [rows.record(LogChunk, db.chunks[(deploy_id, s)]) for s in seqs]

    # -- the processes sharing the queue --

    async def register_node(
        self, node: str, name: str, pid: int, address: str | None = None
    ) -> None:
        async with self._transaction():
            found = self._db.nodes.get(node)
            if found is not None:
                found["seen_at"] = clock()
                return
            self._db.nodes[node] = {
                "id": node,
                "name": name,
                "pid": pid,
                "started_at": utcnow(),
                "seen_at": clock(),
                "address": address,
            }

    async def renew_node(self, node: str) -> bool:
        async with self._transaction():
            found = self._db.nodes.get(node)
            if found is None:
                return False
            found["seen_at"] = clock()
            return True

    async def expire_nodes(self, lapse: float) -> list[Deploy]:
        async with self._transaction():
            db = self._db
            now = clock()
            db.nodes = {n: row for n, row in db.nodes.items() if row["seen_at"] >= now - lapse}
            self._drop_orphan_homes()
            gone = []
            for _, row in sorted(db.deploys.items()):
                if row["status"] == "running" and row["runner"] not in db.nodes:
                    reason = "the gateway running it stopped answering"
                elif (
                    row["status"] == "queued"
                    and row["mode"] == "gate"
                    and row["origin"] not in db.nodes
                ):
                    reason = "the gated push was lost with the gateway holding it"
                else:
                    continue
                row.update(status="interrupted", finished_at=utcnow(), reason=reason)
                gone.append(self._deploy(row))
        for deploy in gone:
            self._announce("done", deploy.id)
        if gone:
            self._announce("queue")
        return gone

    async def leave_node(self, node: str) -> None:
        async with self._transaction():
            self._db.nodes.pop(node, None)
            self._drop_orphan_homes()

    async def list_nodes(self) -> list[Node]:
        async with self._reading() as db:
            return [rows.record(Node, db.nodes[n]) for n in sorted(db.nodes)]
