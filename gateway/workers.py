"""`serve --workers N`: a supervising process and N gateway worker processes on one port.

The supervisor binds the listening sockets once (the SSH listener and, if configured, the
HTTP ones) and hands them to the workers it starts: every worker accepts from the same SSH
socket, so the kernel queues new connections in one place and whichever worker is free
takes the next one; a worker that dies loses no queued connection, and port 0 works (the
supervisor knows and prints the port). (SO_REUSEPORT would give each worker its own queue,
filled by a hash of the client's address whatever that worker's load, and the connections
queued on a dying worker's socket would be reset.)

Each worker is a whole gateway (store connection, SSH server, control socket for its
hooks, deploy service). Worker 0 also serves HTTP (API, keys page, /metrics, probes) on the
inherited HTTP sockets: one HTTP listener per node, and it runs the node's one-time work
(repository checks at start, retention). The supervisor turns SIGTERM or SIGINT into SIGTERM
to every worker (drain), a second one into SIGUSR1 (the accepting period ends), and forwards
SIGHUP (reload); workers leave a terminal's SIGINT to it. It restarts a worker that dies
unexpectedly (with a growing delay), and exits once all have drained; workers get SIGTERM if
the supervisor dies (PR_SET_PDEATHSIG), even when it is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .domain.homes import forwarding
from .errors import GatewayError
from .net.listener import bind
from .shared_limits import SharedCounts

log = logging.getLogger("gateway.workers")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that dies is started again after FIRST_DELAY, doubled at each death in a row up
# to MAX_DELAY; one that ran STABLE_SECONDS before dying starts the count again.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_SECONDS = 60.0
READY = b"ready\n"
PR_SET_PDEATHSIG = 1


def cores() -> int:
    """CPU cores this process may run on (its affinity, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def metrics_dir(config: Config) -> Path:
    """Where the workers' metrics files go: beside this node's control socket, which is
    the node's own (several nodes on one machine each have theirs)."""
    return Path(f"{config.storage.control_socket}.metrics")


def control_socket(path: Path, index: int) -> Path:
    """Worker 0 keeps the configured control socket (the CLI's `deploy logs --follow` and
    `deploy cancel` reach it); the others listen beside it."""
    return path if index == 0 else Path(f"{path}.{index}")


@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor tells one worker: its place, its inherited descriptors."""

    index: int
    workers: int
    parent: int
    ssh_fds: tuple[int, ...]
    http_fds: tuple[int, ...]
    monitoring_fds: tuple[int, ...]
    ready_fd: int
    admission_fd: int
    metrics_dir: str
    http_address: tuple[str, int] | None
    prepare: bool  # the node's first worker 0: check the repositories before serving
    # The internal listener ([cluster] listen), shared by every worker like the SSH port.
    cluster_fds: tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerRole:
        data: dict[str, Any] = json.loads(text)
        for name in ("ssh_fds", "http_fds", "monitoring_fds", "cluster_fds"):
            data[name] = tuple(data[name])
        if data["http_address"] is not None:
            data["http_address"] = tuple(data["http_address"])
        return cls(**data)

    @property
    def serves_http(self) -> bool:
        return self.index == 0

    def die_with_parent(self) -> None:
        """Get SIGTERM (a drain) when the supervisor dies, however it dies."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != self.parent:  # it died before the line above
            raise GatewayError("the supervising process is gone")

    def adapt(self, config: Config) -> Config:
        """This worker's view of the node's configuration: its own control socket, and
        no HTTP listener unless it is the one that serves HTTP."""
        storage = dataclasses.replace(
            config.storage, control_socket=control_socket(config.storage.control_socket, self.index)
        )
        http = config.http
        if not self.serves_http:
            http = dataclasses.replace(http, listen=None, monitoring_listen=None)
        return dataclasses.replace(config, storage=storage, http=http)

    def sockets(self, fds: tuple[int, ...]) -> list[socket.socket]:
        listening = [socket.socket(fileno=fd) for fd in fds]
        for sock in listening:
            sock.setblocking(False)
        return listening

    def shared_counts(self) -> SharedCounts:
        return SharedCounts(self.admission_fd, region=self.index)

    def notify_ready(self) -> None:
        try:
            os.write(self.ready_fd, READY)
        except OSError:
            pass  # the supervisor is gone; PR_SET_PDEATHSIG stops us
        finally:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    deaths: int = 0  # deaths in a row, for the restart delay


class Supervisor:
    """Starts, watches, signals and restarts the workers of one node."""

    def __init__(self, config: Config, count: int, config_path: Path | None) -> None:
        self.config = config
        self.count = count
        self.config_path = config_path
        self.metrics_dir = metrics_dir(config)
        self.workers = [Worker(i) for i in range(count)]
        self.ssh: list[socket.socket] = []
        self.http: list[socket.socket] = []
        self.monitoring: list[socket.socket] = []
        self.cluster: list[socket.socket] = []
        self.counts: SharedCounts | None = None
        self._stop = asyncio.Event()
        self._own_metrics_dir = False

    # -- setup and teardown --

    def _bind(self) -> None:
        cfg = self.config
        try:
            self.ssh = bind(*cfg.ssh.listen)
        except OSError as exc:
            host, port = cfg.ssh.listen
            raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        http = cfg.http
        for attr, address in (
            ("http", http.listen),
            ("monitoring", http.monitoring_listen),
            # Only where repositories are forwarded (see gateway.domain.homes).
            ("cluster", cfg.cluster.listen if forwarding(cfg) else None),
        ):
            if address is None:
                continue
            try:
                setattr(self, attr, bind(*address))
            except OSError as exc:
                raise GatewayError(
                    f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}"
                ) from None

    def _prepare_metrics_dir(self) -> None:
        """A fresh, private directory: files of an earlier run would add their counts to
        this one's, and the values are the node's business only."""
        path = self.metrics_dir
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
        path.chmod(0o700)
        self._own_metrics_dir = True

    def _close(self) -> None:
        for sock in (*self.ssh, *self.http, *self.monitoring, *self.cluster):
            sock.close()
        if self.counts is not None:
            self.counts.close()
            os.close(self.counts.fd)
        if self._own_metrics_dir:  # not another run's, when this one could not even bind
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    # -- running --

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled)
        loop.add_signal_handler(signal.SIGHUP, self._forward_reload)
        try:
            self._bind()
            self._prepare_metrics_dir()
            self.counts = SharedCounts.create(self.count, self.config.limits.max_connections)
            # Worker 0 first: it migrates the registry and checks the repositories, which
            # the others then need not do, all at once, at every start.
            started = await self._start(self.workers[0], prepare=True)
            if started:
                rest = await asyncio.gather(*(self._start(w) for w in self.workers[1:]))
                started = all(rest)
            if self._stop.is_set():  # asked to stop while starting
                return await self._shutdown()
            if not started:
                raise GatewayError("a worker did not start (see its error above)")
            self._announce()
            watchers = [asyncio.ensure_future(self._watch(w)) for w in self.workers]
            await self._stop.wait()
            return await self._shutdown(watchers)
        except BaseException:
            await self._shutdown()
            raise
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._close()

    def _announce(self) -> None:
        pids = ",".join(str(w.proc.pid) for w in self.workers if w.proc is not None)
        log.info("event=workers_ready workers=%d pids=%s", self.count, pids)
        if self.http:
            log.info("event=http_listening address=%s:%d", *self.http[0].getsockname()[:2])
        for sock in self.ssh:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            log.info("event=listening address=%s:%d workers=%d", shown, port, self.count)

    async def _start(self, worker: Worker, prepare: bool = False) -> bool:
        """Start a worker and wait until it serves; False if it exited first."""
        if self.counts is None:
            raise RuntimeError("the admission table is not set up")
        self.counts.clear(worker.index)
        read_end, write_end = os.pipe()
        http_address = None
        if self.http:
            host, port = self.http[0].getsockname()[:2]
            http_address = (str(host), int(port))
        role = WorkerRole(
            index=worker.index,
            workers=self.count,
            parent=os.getpid(),
            ssh_fds=tuple(s.fileno() for s in self.ssh),
            http_fds=tuple(s.fileno() for s in self.http) if worker.index == 0 else (),
            monitoring_fds=tuple(s.fileno() for s in self.monitoring) if worker.index == 0 else (),
            ready_fd=write_end,
            admission_fd=self.counts.fd,
            metrics_dir=str(self.metrics_dir),
            http_address=http_address,
            prepare=prepare,
            cluster_fds=tuple(s.fileno() for s in self.cluster),
        )
        argv = [sys.executable, "-m", "gateway"]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        argv += ["serve", "--worker-of", role.to_json()]
        fds = (
            *role.ssh_fds,
            *role.http_fds,
            *role.monitoring_fds,
            *role.cluster_fds,
            write_end,
            self.counts.fd,
        )
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, METRICS_ENV: str(self.metrics_dir)},
                pass_fds=fds,
            )
        finally:
            os.close(write_end)
        worker.started = time.monotonic()
        worker.ready = False
        log.info("event=worker_started worker=%d pid=%d", worker.index, worker.proc.pid)
        try:
            # EOF (b"") if the worker exits without being ready: the pipe's only writer.
            reading = asyncio.ensure_future(asyncio.to_thread(os.read, read_end, len(READY)))
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not reading.done():  # stopped while it starts (a hung registry, say)
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
            answer = await reading
        finally:
            os.close(read_end)
        worker.ready = answer == READY
        if not worker.ready:
            await worker.proc.wait()
            self._reap(worker)
        return worker.ready

    def _reap(self, worker: Worker) -> None:
        """Bookkeeping for a worker that exited: its live gauges and its connection counts
        no longer count."""
        from prometheus_client.multiprocess import mark_process_dead

        if worker.proc is not None:
            with contextlib.suppress(OSError):
                mark_process_dead(worker.proc.pid, str(self.metrics_dir))
        if self.counts is not None:
            self.counts.clear(worker.index)

    async def _watch(self, worker: Worker) -> None:
        """Restart the worker whenever it dies, until the node stops."""
        while worker.proc is not None:
            code = await worker.proc.wait()
            if self._stop.is_set():
                return
            self._reap(worker)
            lived = time.monotonic() - worker.started
            worker.deaths = 1 if lived >= STABLE_SECONDS else worker.deaths + 1
            delay = min(FIRST_DELAY * 2 ** (worker.deaths - 1), MAX_DELAY)
            log.error(
                "event=worker_died worker=%d pid=%d code=%d lived=%.1f restart_in=%.1f",
                worker.index,
                worker.proc.pid,
                code,
                lived,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            if await self._start(worker):
                log.info("event=worker_restarted worker=%d pid=%d", worker.index, worker.proc.pid)
            if self._stop.is_set() and worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGTERM)  # stopped while it was starting
                await worker.proc.wait()

    def _signalled(self) -> None:
        """The first SIGTERM or SIGINT stops the node (SIGTERM to every worker, in
        `_shutdown`); each later one ends the workers' accepting period (SIGUSR1: a worker
        takes any number of SIGTERMs as one, see Gateway._signal_handlers)."""
        if not self._stop.is_set():
            self._stop.set()
            return
        # Only to workers that serve: SIGUSR1 would kill one without its handlers yet (and
        # one still starting is stopped by `_start`).
        log.info("event=stop_hurried workers=%d", self._signal_serving(signal.SIGUSR1))

    def _forward_reload(self) -> None:
        """SIGHUP to every worker that serves (one still starting reads the file anyway,
        and has no handler for SIGHUP yet)."""
        log.info("event=reload_forwarded workers=%d", self._signal_serving(signal.SIGHUP))

    def _signal_serving(self, signum: int) -> int:
        """Send `signum` to every worker that serves; how many got it."""
        sent = 0
        for worker in self.workers:
            if worker.ready and worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signum)
                    sent += 1
        return sent

    async def _shutdown(self, watchers: Sequence[asyncio.Future[None]] | None = None) -> int:
        """SIGTERM to every worker; wait until each has drained and exited."""
        self._stop.set()
        running = [w for w in self.workers if w.proc is not None and w.proc.returncode is None]
        if running:
            log.info("event=stopping workers=%d", len(running))
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        # No worker will be started again: once the draining workers have closed their
        # copies too, new connections are refused rather than left queued on a socket
        # nobody accepts from.
        for sock in (*self.ssh, *self.http, *self.monitoring, *self.cluster):
            sock.close()
        codes = [await w.proc.wait() for w in running]  # type: ignore[union-attr]
        for task in watchers or ():
            with contextlib.suppress(BaseException):
                await task
        # A worker stopped while still starting has no handler yet: SIGTERM ends it as such.
        bad = [c for c in codes if c not in (0, -signal.SIGTERM)]
        log.info("event=stopped workers=%d failed=%d", len(codes), len(bad))
        return 1 if bad else 0
