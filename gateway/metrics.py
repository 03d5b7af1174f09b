"""Prometheus metrics of one gateway: connections, auth, git operations, limits, deploys.

With several worker processes (`serve --workers N`), every worker writes its values to
files in one private directory (prometheus_client's multiprocess mode, chosen by
$PROMETHEUS_MULTIPROC_DIR when the library is imported) and `/metrics` adds them up: the
node, not the one worker that answers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Clones and pushes range from a ls-remote (ms) to a multi-GB first push (minutes).
GIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600, 1800)
DEPLOY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


# A forwarded operation's ends: git's own (ok, error), the client leaving, the home node
# lost in the middle, or no channel to it at all.
FORWARD_OUTCOMES = ("ok", "error", "client_gone", "home_lost", "unreachable")


class Metrics:
    """One registry per gateway (not the global default), so that several gateways in one
    process, as in the tests, keep separate counts."""

    def __init__(self, multiprocess_dir: Path | None = None, supervisor: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.multiprocess_dir = multiprocess_dir
        self.supervisor = supervisor
        # What is not kept in the multiprocess files: build info, and process_* (read from
        # /proc at each scrape, for every process of the node).
        self.local = CollectorRegistry(auto_describe=True) if multiprocess_dir else r
        if multiprocess_dir is None:
            ProcessCollector(registry=r)
        Info("gateway_build", "git-gateway version", registry=self.local).info(
            {"version": __version__}
        )
        # Gauges of several workers add up ("livesum": only live workers count).
        self.connections_open = Gauge(
            "gateway_connections_open",
            "SSH connections currently open",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Counter(
            "gateway_connections", "SSH connections accepted (admitted)", registry=r
        )
        self.auth = Counter(
            "gateway_auth_results",
            "Authentication outcomes by reason",
            ["result"],
            registry=r,
        )
        self.git_ops = Counter(
            "gateway_git_operations",
            "git services served, by verb and outcome",
            ["verb", "outcome"],
            registry=r,
        )
        self.git_forwarded = Counter(
            "gateway_git_forwarded",
            "git services forwarded to the app's home node, by verb and outcome",
            ["verb", "outcome"],
            registry=r,
        )
        self.git_duration = Histogram(
            "gateway_git_operation_duration_seconds",
            "Duration of git services, by verb",
            ["verb"],
            buckets=GIT_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "gateway_git_bytes",
            "Bytes moved by git services: in = from clients, out = to clients",
            ["direction", "verb"],
            registry=r,
        )
        self.commands = Counter(
            "gateway_ssh_commands",
            "SSH commands by name and outcome (git services and the others)",
            ["command", "outcome"],
            registry=r,
        )
        self.limit_rejections = Counter(
            "gateway_limit_rejections",
            "Requests refused by a limit, by limit",
            ["limit"],
            registry=r,
        )
        self.proxy_rejections = Counter(
            "gateway_proxy_protocol_rejections",
            "Connections closed for a missing, malformed or untrusted PROXY header",
            ["reason"],
            registry=r,
        )
        self.deploys = Counter(
            "gateway_deploys", "Deploys that ended, by final status", ["status"], registry=r
        )
        self.deploy_duration = Histogram(
            "gateway_deploy_duration_seconds",
            "Run time of deploys that started, by final status",
            ["status"],
            buckets=DEPLOY_BUCKETS,
            registry=r,
        )
        # The queue is the registry's, shared by every process of every node: each reports
        # what it last saw (max across workers; take max across nodes too).
        self.deploys_queued = Gauge(
            "gateway_deploys_queued",
            "Deploys waiting in the shared queue, as this node last saw it",
            registry=r,
            multiprocess_mode="max",
        )
        self.deploy_queue_oldest = Gauge(
            "gateway_deploy_queue_oldest_seconds",
            "How long the oldest queued deploy has waited (0: none waits)",
            registry=r,
            multiprocess_mode="max",
        )
        self.webhook_deliveries = Counter(
            "gateway_webhook_deliveries",
            "Deploy webhook delivery attempts, by result (2xx, 3xx, 4xx, 5xx, error: no answer)",
            ["result"],
            registry=r,
        )
        self.deploys_running = Gauge(
            "gateway_deploys_running",
            "Deploys running now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.workers = Gauge(
            "gateway_workers",
            "Worker processes serving (1 without --workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.workers.set(1)
        self.http_requests = Counter(
            "gateway_http_requests",
            "HTTP requests by route and status code",
            ["route", "code"],
            registry=r,
        )

        self.pack_cache = Counter(
            "gateway_pack_cache_requests",
            "pack-objects requests by answer: hit (a cached pack), shared (another identical"
            " request's run, streamed live), miss (ran pack-objects), bypass (cache unusable)",
            ["result"],
            registry=r,
        )
        self.pack_cache_served = Counter(
            "gateway_pack_cache_served_bytes",
            "Pack bytes served from the cache or from an identical request's run",
            registry=r,
        )
        self.pack_cache_written = Counter(
            "gateway_pack_cache_written_bytes", "Bytes written into the pack cache", registry=r
        )

    def pack_cache_done(self, result: str, served: int, written: int) -> None:
        self.pack_cache.labels(result).inc()
        self.pack_cache_served.inc(served)
        self.pack_cache_written.inc(written)

    def git_done(
        self, verb: str, outcome: str, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        self.git_ops.labels(verb, outcome).inc()
        self.git_duration.labels(verb).observe(seconds)
        self.bytes.labels("in", verb).inc(bytes_in)
        self.bytes.labels("out", verb).inc(bytes_out)

    def forwarded(self, verb: str, outcome: str) -> None:
        """One operation this node forwarded; `outcome` one of FORWARD_OUTCOMES."""
        self.git_forwarded.labels(verb, outcome).inc()

    def deploy_done(self, status: str, seconds: float | None) -> None:
        self.deploys.labels(status).inc()
        if seconds is not None:
            self.deploy_duration.labels(status).observe(seconds)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        return generate_latest(_Node(self.multiprocess_dir, self.local, self.supervisor))


# Live workers have a file of live gauges (removed when the supervisor sees them die).
_LIVE_FILE = re.compile(r"gauge_livesum_(\d+)\.db")
# process_* figures that add up over processes; the others are taken as below.
_SUMMED = {
    "process_cpu_seconds",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
}


class _Node:
    """Every worker's values from the multiprocess files; build info; process_* added up
    over the supervisor and the live workers (start time: the earliest; max_fds: the
    lowest, the first to run out)."""

    def __init__(self, directory: Path, local: CollectorRegistry, supervisor: int | None) -> None:
        self.directory = directory
        self.files = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
        self.local = local
        self.supervisor = supervisor

    def pids(self) -> list[int]:
        found = {
            int(m.group(1)) for p in self.directory.iterdir() if (m := _LIVE_FILE.fullmatch(p.name))
        }
        if self.supervisor is not None:
            found.add(self.supervisor)
        return sorted(found)

    def processes(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in self.pids():
            collector = ProcessCollector(pid=functools.partial(_same, pid), registry=None)
            for family in collector.collect():
                if not family.samples:
                    continue  # the process is gone
                value = family.samples[0].value
                kept = families.get(family.name)
                if kept is None:
                    families[family.name] = family
                    continue
                old = kept.samples[0]
                summed = family.name in _SUMMED
                merged = old.value + value if summed else min(old.value, value)
                kept.samples[0] = old._replace(value=merged)
        yield from families.values()

    def collect(self) -> Iterable[Metric]:
        yield from self.files.collect()  # type: ignore[no-untyped-call]
        yield from self.local.collect()
        yield from self.processes()


def _same(pid: int) -> int:
    """ProcessCollector asks for its pid through a callable."""
    return pid
