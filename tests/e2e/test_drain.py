"""SIGTERM behind a balancer (issue 19): /readyz turns 503 at once, the listener keeps
accepting for [server] drain_accept_seconds, then closes and running work drains; a second
signal ends the accepting period; clients that stall then cannot hold the node."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.test_cluster import Balanced, free_port, http_port, wait_listening
from tests.e2e.test_haproxy import HAPROXY, REQUIRED, ROOT
from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    LiveProcess,
    ServeProcess,
    ServerThread,
    http,
    http_base,
    write_config,
)


def node_config(tmp_path: Path, accept: float, **overrides: dict[str, object]) -> Path:
    server = {"drain_accept_seconds": accept, **overrides.pop("server", {})}
    return write_config(tmp_path / "gw", server=server, **overrides)


def abandon(server: ServerThread) -> None:
    """Stop the loop of a ServerThread whose gateway has closed itself (or failed to)."""
    server.loop.call_soon_threadsafe(server.loop.stop)
    server.thread.join(TIMEOUT)
    server.loop.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_accepting_period_serves_new_connections_while_readyz_says_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = node_config(tmp_path, 60)
    key = Admin(config).enroll("dana", tmp_path, "web")
    server = ServerThread(config).start()
    port, base = server.port, http_base(server)
    client = Client(tmp_path / "home", key, server, name="dana")
    hurry = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="gateway.server"):
        stopping = asyncio.run_coroutine_threadsafe(server.gateway.shutdown(hurry), server.loop)
        try:
            server.wait_until(lambda: server.gateway.draining)
            reply = http("GET", base + "/readyz")
            assert reply.status == 503 and reply.json()["checks"]["ssh"] == "draining"
            # A balancer that has not seen the 503 yet sends a connection: it is served.
            assert client.git("ls-remote", client.url("web")).returncode == 0
            assert not stopping.done()
            server.loop.call_soon_threadsafe(hurry.set)  # what a second SIGTERM does
            stopping.result(TIMEOUT)
        finally:
            abandon(server)
    assert refused(port)
    assert "event=draining accept_seconds=60.0 drain_timeout=60.0" in caplog.text
    assert re.search(r"event=listener_closed reason=second_signal logins=0 sessions=0", caplog.text)


def test_the_listener_closes_once_the_accepting_period_is_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = ServerThread(node_config(tmp_path, 0.5)).start()
    port = server.port
    with caplog.at_level(logging.INFO, logger="gateway.server"):
        started = time.monotonic()
        try:
            server.call(server.gateway.shutdown())
        finally:
            abandon(server)
    assert time.monotonic() - started >= 0.5
    assert "event=listener_closed reason=accept_period_over" in caplog.text
    assert refused(port)


def test_regression_a_connection_queued_as_the_listener_closes_is_served_not_reset(
    tmp_path: Path,
) -> None:
    """The kernel completes a TCP handshake before the gateway accepts it: one that is
    queued when the listener closes is taken and served, not reset (the client would see
    `kex_exchange_identification: Connection closed by remote host`)."""
    server = ServerThread(node_config(tmp_path, 0)).start()
    listener = server.gateway.listener
    assert listener is not None

    async def pause_accepting() -> None:  # as if the loop were busy elsewhere
        for task in listener._accepting:
            task.cancel()

    try:
        server.call(pause_accepting())
        queued = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        server.call(listener.close())
        assert queued.recv(64).startswith(b"SSH-2.0-git-gateway")
        queued.close()
    finally:
        server.stop()


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (fails on a timeout)."""
    sock.settimeout(TIMEOUT)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_regression_clients_that_stall_in_the_accepting_period_cannot_hold_the_node(
    tmp_path: Path,
) -> None:
    """Connections let in while the node drains, then stalled every way one can (silent
    TCP, a login stopped after the version line, logged in asking for nothing, a fetch
    stopped after the ref advertisement): the node still exits, drain_timeout after its
    listener closed, far below the login (60 s) and idle (600 s) timeouts."""
    config = node_config(tmp_path, 60, limits={"drain_timeout": 2})
    key = Admin(config).enroll("mal", tmp_path, "web")
    node = ServeProcess(config)
    client = Client(tmp_path / "home", key, node, name="mal")  # type: ignore[arg-type]
    stalled: list[subprocess.Popen[bytes]] = []
    try:
        node.proc.send_signal(signal.SIGTERM)
        node.wait_for(r"event=draining accept_seconds=60")
        silent = socket.create_connection(("127.0.0.1", node.port), timeout=TIMEOUT)
        version_only = socket.create_connection(("127.0.0.1", node.port), timeout=TIMEOUT)
        version_only.sendall(b"SSH-2.0-stall\r\n")
        for sock in (silent, version_only):
            assert sock.recv(64).startswith(b"SSH-2.0-git-gateway")  # accepted, served
        options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "env": client.env}
        idle = subprocess.Popen(
            [*client.ssh_base, "-N", "git@127.0.0.1"], stdin=subprocess.DEVNULL, **options
        )
        fetch = subprocess.Popen(
            [*client.ssh_base, "-T", "git@127.0.0.1", "git-upload-pack 'web.git'"],
            stdin=subprocess.PIPE,
            **options,
        )
        stalled += [idle, fetch]
        assert select.select([fetch.stdout], [], [], TIMEOUT)[0]
        assert fetch.stdout.read(4)  # type: ignore[union-attr]
        node.wait_for(r"event=auth_ok .*user=mal")
        node.wait_for(r"event=auth_ok .*user=mal")
        # The second SIGTERM closes the listener: two logins, one session and one
        # logged-in connection that asks for nothing are what the drain waits for (the
        # last one may still count as a login: auth_ok is logged just before it ends).
        node.proc.send_signal(signal.SIGTERM)
        node.wait_for(r"event=listener_closed reason=second_signal logins=[23] sessions=1")
        closed = time.monotonic()
        assert node.finish() == 0
        assert time.monotonic() - closed < 2 + 6
        # Logins in progress and connections without a command only get LOGIN_GRACE_SECONDS
        # (here all of drain_timeout): at the end, the stalled fetch is what is left.
        assert "event=drain_timeout left=1" in node.stderr
        for sock in (silent, version_only):
            read_to_end(sock)
            sock.close()
        for proc in stalled:
            proc.communicate(timeout=TIMEOUT)
            assert proc.returncode != 0
    finally:
        for proc in stalled:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
        if node.proc.poll() is None:
            node.kill()


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill-group"])
def test_workers_count_a_signal_to_their_whole_group_once(
    tmp_path: Path, first: signal.Signals
) -> None:
    """A terminal's Ctrl-C, or a kill of the process group (systemd's default KillMode),
    reaches the supervisor and every worker: the workers still count one signal (they keep
    accepting); a reload meanwhile is skipped; the next Ctrl-C, through the supervisor,
    ends their accepting period."""
    config = node_config(tmp_path, 60, server={"workers": 2})
    key = Admin(config).enroll("wes", tmp_path, "web")
    node = ServeProcess(config)
    client = Client(tmp_path / "home", key, node, name="wes")  # type: ignore[arg-type]
    try:
        pids = [
            int(p) for p in re.findall(r"event=worker_started worker=\d pid=(\d+)", node.stderr)
        ]
        http_port = re.findall(r"event=http_listening address=127\.0\.0\.1:(\d+)", node.stderr)[0]
        for pid in (*pids, node.proc.pid):
            os.kill(pid, first)
        draining = {node.wait_for(r"worker=(\d) event=draining").group(1) for _ in pids}
        assert draining == {"0", "1"}
        node.proc.send_signal(signal.SIGHUP)
        skipped = {
            node.wait_for(r"worker=(\d) event=reload_skipped reason=draining").group(1)
            for _ in pids
        }
        assert skipped == {"0", "1"}
        reply = http("GET", f"http://127.0.0.1:{http_port}/readyz")
        assert reply.status == 503 and reply.json()["checks"]["ssh"] == "draining"
        for _ in range(3):  # served by whichever worker takes it: both still accept
            assert client.git("ls-remote", client.url("web")).returncode == 0
        second = datetime.now(UTC) - timedelta(milliseconds=1)  # the log's precision
        node.proc.send_signal(signal.SIGINT)
        assert node.finish() == 0
        assert "event=stop_hurried workers=2" in node.stderr
        closed = re.findall(
            r"^(\S+) .* worker=(\d) event=listener_closed reason=second_signal", node.stderr, re.M
        )
        assert sorted(worker for _, worker in closed) == ["0", "1"]
        # ...closed by the second Ctrl-C, not by the first one counted twice.
        assert all(datetime.fromisoformat(when) >= second for when, _ in closed)
    finally:
        if node.proc.poll() is None:
            node.kill()


def one_host_haproxy(port: int, nodes: list[ServeProcess]) -> str:
    """config/haproxy.cfg with its "two nodes on one host" server lines, on these nodes'
    ports, and checks every 300 ms (a node is out after two failed ones)."""
    text = (ROOT / "config" / "haproxy.cfg").read_text()
    example = re.findall(r"^#     (server gw\d 127\.0\.0\.1:)\d+( check port )\d+$", text, re.M)
    assert len(example) == len(nodes), "config/haproxy.cfg: the one-host example changed"
    servers = "".join(
        f"    {server}{node.port}{check}{http_port(node)}\n"
        for (server, check), node in zip(example, nodes, strict=True)
    )
    replacements = {
        "log stdout format raw local0": "log stderr format raw local0",
        "bind :22": f"bind 127.0.0.1:{port}",
        "inter 2s": "inter 300ms",
        "    server gw1 10.0.0.11:2222\n    server gw2 10.0.0.12:2222\n": servers,
    }
    for old, new in replacements.items():
        assert old in text, f"config/haproxy.cfg no longer has {old!r}"
        text = text.replace(old, new)
    return text


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_behind_haproxy_loses_no_connection(
    tmp_path: Path, pg_url: str, workers: int
) -> None:
    """Issue 19's proof: two nodes on one PostgreSQL registry behind the committed HAProxy
    config; 50 `git ls-remote` through it, four at a time; one node gets SIGTERM in the
    middle (a single process, or a supervisor with two workers). No client sees an error,
    the stopped node served connections while HAProxy had not noticed yet, and it exits 0."""
    if not Path(HAPROXY).exists():
        if REQUIRED:
            pytest.fail("haproxy is not installed")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")

    def config(name: str, accept: float, count: int) -> Path:
        return write_config(
            tmp_path / name,
            server={"workers": count, "drain_accept_seconds": accept},
            storage={
                "database": pg_url,
                "repos": str(tmp_path / "repos"),
                "control_socket": str(tmp_path / name / "gw.sock"),
            },
            ssh={
                "host_key_dir": str(tmp_path / "hostkeys"),
                "proxy_protocol": "required",
                "proxy_allowed": ["127.0.0.1/32"],
            },
        )

    # The stopped node accepts for 3 s: HAProxy needs 0.3 to 0.9 s to take it out.
    stopped = ServeProcess(config("a", 3, workers))
    other = ServeProcess(config("b", 0, 1))
    port = free_port()
    haproxy_cfg = tmp_path / "haproxy.cfg"
    haproxy_cfg.write_text(one_host_haproxy(port, [stopped, other]))
    balancer = LiveProcess([HAPROXY, "-db", "-f", str(haproxy_cfg)])
    try:
        wait_listening(port)
        key = Admin(stopped.config_path).enroll("pat", tmp_path, "web")
        client = Client(tmp_path / "home", key, Balanced(stopped, port), name="pat")  # type: ignore[arg-type]

        def ls_remote(_: int) -> subprocess.CompletedProcess[str]:
            return client.git("ls-remote", client.url("web"), check=False)

        results: list[subprocess.CompletedProcess[str]] = []
        with ThreadPoolExecutor(4) as pool:
            results += pool.map(ls_remote, range(20))  # both nodes serve
            stopped.proc.send_signal(signal.SIGTERM)
            stopped.wait_for(r"event=draining accept_seconds=3")
            results += pool.map(ls_remote, range(15))  # until HAProxy notices, and after
            stopped.wait_for(r"event=listener_closed reason=accept_period_over")
            results += pool.map(ls_remote, range(15))  # the other node alone
        failures = [r.stderr for r in results if r.returncode != 0]
        assert len(results) == 50 and not failures, failures
        assert stopped.finish() == 0
        balancer.wait_for(r"Server gateways/gw1 is DOWN")
        log = stopped.stderr
        after = log[log.index("event=draining") :]
        assert re.search(r"event=auth_ok .*user=pat", after), "none reached it while draining"
        assert "event=drain_timeout" not in log
        assert other.stop() == 0
    finally:
        balancer.kill()
        for node in (stopped, other):
            if node.proc.poll() is None:
                node.kill()


@pytest.mark.slow
def test_regression_a_strangers_silent_connection_does_not_hold_an_idle_node(
    tmp_path: Path,
) -> None:
    """Found in review: logins in progress were waited for as long as sessions, so someone
    with no key who keeps one TCP connection open to the SSH port (renewed every
    login_timeout) made every restart of an idle node take drain_timeout, during which, on
    one node, nobody can connect. Logins now get LOGIN_GRACE_SECONDS (10) of the drain."""
    node = ServeProcess(node_config(tmp_path, 0, limits={"drain_timeout": 20}))
    stranger = socket.create_connection(("127.0.0.1", node.port), timeout=TIMEOUT)
    try:
        assert stranger.recv(64).startswith(b"SSH-2.0-git-gateway")  # then says nothing
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.finish() == 0
        assert time.monotonic() - started < 15
    finally:
        stranger.close()
        if node.proc.poll() is None:
            node.kill()
