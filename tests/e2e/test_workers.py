"""`git-gateway serve --workers 2` as operators run it: one port served by two worker
processes under a supervisor, with node-wide metrics and limits, signals reaching every
worker, a killed worker replaced, and workers that never outlive their supervisor.

Which worker takes a connection is the kernel's choice; to make it ours, the tests stop
one worker (SIGSTOP) so that the other must accept, and resume it afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    TIMEOUT,
    Admin,
    Client,
    ServeProcess,
    banner,
    fsck,
    http,
    run,
    write_config,
)


def start(directory: Path, **overrides: dict[str, object]) -> ServeProcess:
    node = ServeProcess(write_config(directory, **overrides), args=("--workers", "2"))
    # Logged just before "listening on", which ServeProcess waited for.
    pids = re.search(r"event=workers_ready .*pids=([\d,]+)", node.stderr).group(1)
    node.pids = [int(p) for p in pids.split(",")]  # type: ignore[attr-defined]
    return node


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    directory = tmp_path_factory.mktemp("workers")
    # A leftover of an earlier run, open to everyone: it must be gone, and private.
    stale = directory / "gw.sock.metrics"
    stale.mkdir(mode=0o777)
    stale.chmod(0o777)
    (stale / "counter_999999.db").write_bytes(b"stale")
    server = start(directory, http={"listen": "127.0.0.1:0"})
    server.directory = directory  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def alice(node, tmp_path_factory) -> Client:
    home = tmp_path_factory.mktemp("alice")
    key = Admin(node.config_path).enroll("alice", home, "shop")
    return Client(home, key, node, "alice")  # type: ignore[arg-type]


@contextlib.contextmanager
def only(node: ServeProcess, index: int) -> Iterator[None]:
    """Let only worker `index` accept: the others are stopped meanwhile."""
    others = [pid for i, pid in enumerate(node.pids) if i != index]  # type: ignore[attr-defined]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def wait_for_each(node: ServeProcess, pattern: str, count: int = 2) -> set[str]:
    """Wait until `pattern` (whose group 1 is the worker number) was logged by `count`
    different workers."""
    seen: set[str] = set()
    while len(seen) < count:
        seen.add(node.wait_for(pattern).group(1))
    return seen


def metric(node: ServeProcess, name: str) -> float:
    port = int(re.search(r"event=http_listening address=127\.0\.0\.1:(\d+)", node.stderr).group(1))
    body = http("GET", f"http://127.0.0.1:{port}/metrics").body.decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{body}"
    return float(match.group(1))


def process_gone(pid: int, timeout: float = TIMEOUT) -> bool:
    """Wait for a process that is not our child to exit (a pidfd turns readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_both_workers_serve_clones_and_pushes_on_one_port(node, alice, tmp_path) -> None:
    work = alice.new_repo(tmp_path / "work")
    for index in (0, 1):
        with only(node, index):
            alice.commit(work, {f"from-{index}": "x\n"}, f"through worker {index}")
            alice.git("push", "-q", alice.url("shop"), "main", cwd=work)
            clone = tmp_path / f"clone-{index}"
            alice.git("clone", "-q", alice.url("shop"), str(clone))
        assert (clone / f"from-{index}").exists()
        node.wait_for(rf"worker={index} event=auth_ok .*user=alice")
    fsck(node.config.storage.repos / "shop.git")


def test_metrics_add_up_every_worker(node, alice) -> None:
    before = metric(node, 'gateway_auth_results_total{result="ok"}')
    for index in (0, 1):
        with only(node, index):
            assert alice.ssh("info").returncode == 0
        node.wait_for(rf"worker={index} event=disconnect .*user=alice")
    # Worker 0 answers /metrics, and counts both logins: its own and worker 1's.
    assert metric(node, 'gateway_auth_results_total{result="ok"}') == before + 2
    assert metric(node, "gateway_workers") == 2
    # process_* too: the supervisor's and both workers' memory, not worker 0's alone.
    rss = {
        pid: int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        for pid in node.pids  # type: ignore[attr-defined]
    }
    assert metric(node, "process_resident_memory_bytes") > 1.5 * rss[node.pids[0]]  # type: ignore[attr-defined]


def test_regression_metrics_directory_is_private_and_fresh(node) -> None:
    directory = node.directory / "gw.sock.metrics"  # type: ignore[attr-defined]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not (directory / "counter_999999.db").exists()  # the stale file went at start
    files = list(directory.iterdir())
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_sighup_reloads_every_worker(node) -> None:
    node.proc.send_signal(signal.SIGHUP)
    assert wait_for_each(node, r"worker=(\d) event=reloaded") == {"0", "1"}


def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(node, alice, tmp_path) -> None:
    os.kill(node.pids[1], signal.SIGKILL)  # type: ignore[attr-defined]
    node.wait_for(r"event=worker_died worker=1 .*code=-9")
    # Meanwhile (or once it is back) the port serves.
    alice.git("clone", "-q", alice.url("shop"), str(tmp_path / "during"))
    new_pid = int(node.wait_for(r"event=worker_restarted worker=1 pid=(\d+)").group(1))
    node.pids[1] = new_pid  # type: ignore[attr-defined]
    with only(node, 1):
        alice.git("clone", "-q", alice.url("shop"), str(tmp_path / "after"))
    node.wait_for(r"worker=1 event=auth_ok .*user=alice")
    # The dead worker's gauge left with it; its counts stay in the node's totals.
    assert metric(node, "gateway_workers") == 2


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(node, alice) -> None:
    pids = list(node.pids)  # type: ignore[attr-defined]
    # A fetch in progress: upload-pack has advertised its refs and waits for the client.
    fetch = subprocess.Popen(
        [*alice.ssh_base, "-T", "git@127.0.0.1", "git-upload-pack 'shop.git'"],
        env=alice.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert select.select([fetch.stdout], [], [], TIMEOUT)[0]
    assert fetch.stdout.read(4)  # type: ignore[union-attr]
    node.proc.send_signal(signal.SIGTERM)
    node.wait_for(r"worker=\d event=listener_closed .*sessions=1")
    # The worker waits for it: the client ends its fetch at its own pace.
    _, err = fetch.communicate(b"0000", timeout=TIMEOUT)
    assert fetch.returncode == 0, err
    assert node.finish() == 0
    assert {m for m in re.findall(r"worker=(\d) event=stopped", node.stderr)} == {"0", "1"}
    assert all(process_gone(pid, 5) for pid in pids)
    assert not (node.directory / "gw.sock.metrics").exists()  # type: ignore[attr-defined]


def test_workers_die_with_a_killed_supervisor(tmp_path) -> None:
    node = start(tmp_path)
    node.kill()  # SIGKILL: no chance to stop its workers itself
    assert all(process_gone(pid) for pid in node.pids)  # type: ignore[attr-defined]


def test_regression_connections_per_address_capped_across_workers(tmp_path) -> None:
    """A client cannot hold the per-address cap on each worker: the cap is the node's.
    Connections that say nothing (a slowloris) are held by worker 1 up to the cap; worker
    0 must then refuse more from that address, and admit again once they are gone, also
    when they go because worker 1 was killed."""
    node = start(
        tmp_path,
        limits={"max_connections_per_address": 3, "max_unauthenticated": 50},
    )
    held: list[socket.socket] = []
    try:
        with only(node, 1):
            for _ in range(3):
                held.append(socket.create_connection(("127.0.0.1", node.port), TIMEOUT))
                assert banner(held[-1]).startswith(b"SSH-")
        with only(node, 0):
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", node.port), TIMEOUT) as extra:
                    assert banner(extra) == b""  # closed before the banner
        node.wait_for(r"worker=0 event=connection_refused .*reason=max_connections_per_address")
        os.kill(node.pids[1], signal.SIGKILL)  # type: ignore[attr-defined]
        node.wait_for(r"event=worker_died worker=1")  # logged once its counts are cleared
        with socket.create_connection(("127.0.0.1", node.port), TIMEOUT) as again:
            assert banner(again).startswith(b"SSH-")
    finally:
        for sock in held:
            sock.close()
        assert node.stop() == 0


def test_worker_count_must_be_sane(tmp_path) -> None:
    admin = Admin(write_config(tmp_path))
    for bad in ("-1", "x", "257"):
        assert admin("serve", "--workers", bad)[0] == 2


def test_workers_on_postgresql(tmp_path, pg_url) -> None:
    """The same node on a PostgreSQL registry: each worker has its own pool, both serve."""
    node = start(tmp_path, storage={"database": pg_url})
    try:
        home = tmp_path / "bob"
        home.mkdir()
        key = Admin(node.config_path).enroll("bob", home, "api")
        bob = Client(home, key, node, "bob")  # type: ignore[arg-type]
        work = bob.new_repo(tmp_path / "work")
        for index in (0, 1):
            with only(node, index):
                bob.commit(work, {f"w{index}": "x\n"}, f"worker {index}")
                bob.git("push", "-q", bob.url("api"), "main", cwd=work)
                bob.git("clone", "-q", bob.url("api"), str(tmp_path / f"clone-{index}"))
            node.wait_for(rf"worker={index} event=auth_ok .*user=bob")
        assert (tmp_path / "clone-1" / "w1").exists()
    finally:
        assert node.stop() == 0


def test_a_worker_that_cannot_start_stops_the_node_with_one_line(tmp_path) -> None:
    config = write_config(tmp_path, git={"binary": str(tmp_path / "no-such-git")})
    result = run(
        [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--workers", "2"]
    )
    assert result.returncode == 1
    assert "error: a worker did not start (see its error above)" in result.stderr
    assert "no-such-git" in result.stderr  # the worker's own reason, above it
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "gw.sock.metrics").exists()


def test_deploys_run_through_any_worker(tmp_path) -> None:
    """Each worker is a process of the cluster: a push through either worker deploys and
    streams the deploy's output to the pusher, and the deploy is recorded once."""
    node = start(tmp_path, deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)]})
    try:
        home = tmp_path / "carol"
        home.mkdir()
        key = Admin(node.config_path).enroll("carol", home, "web")
        carol = Client(home, key, node, "carol")  # type: ignore[arg-type]
        work = carol.new_repo(tmp_path / "work")
        for index in (0, 1):
            with only(node, index):
                sha = carol.commit(work, {f"w{index}": "x\n"}, f"worker {index}")
                pushed = carol.git("push", carol.url("web"), "main", cwd=work)
            assert f"deploying web {sha[:8]}" in pushed.stderr, pushed.stderr
        listed = Admin(node.config_path).ok("deploy", "list", "web", "--json")
        assert [d["status"] for d in json.loads(listed)] == ["succeeded", "succeeded"]
    finally:
        assert node.stop() == 0
