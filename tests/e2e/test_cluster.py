"""Two gateway nodes (each a supervisor with two workers) behind the committed HAProxy
config, on one PostgreSQL registry, one repositories root and one host key directory:
clients see one gateway; a node killed in the middle of a push leaves the repository
consistent; a database restart is survived; deploys queue, run and stream across the nodes,
and a node that dies mid-deploy is noticed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from tests import pg
from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    TIMEOUT,
    Admin,
    Client,
    LiveProcess,
    ServeProcess,
    exchange_subdir,
    fsck,
    http,
    server_refs,
    ssh_connect,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
REQUIRED = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int) -> None:
    """Until something accepts on the port (HAProxy has bound it)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


def http_port(node: ServeProcess) -> int:
    match = re.search(r"event=http_listening address=127\.0\.0\.1:(\d+)", node.stderr)
    assert match, "the node's HTTP listener"
    return int(match.group(1))


@dataclass
class Balanced:
    """What Client needs of a server, reached through HAProxy (one address for both nodes)."""

    node: ServeProcess
    port: int

    def known_hosts(self, path: Path) -> Path:
        path = self.node.known_hosts(path)
        path.write_text(path.read_text().replace(f"]:{self.node.port} ", f"]:{self.port} "))
        return path


class Cluster:
    """The database, two nodes and the balancer; nodes can be killed and started again."""

    def __init__(self, root: Path, database: str, database_server: pg.PostgresServer) -> None:
        self.root = root
        self.database = database
        self.database_server = database_server
        self.configs = {name: self._config(name) for name in ("a", "b")}
        self.nodes = {name: self._serve(name) for name in self.configs}
        self.port = free_port()
        haproxy_cfg = root / "haproxy.cfg"
        haproxy_cfg.write_text(self._haproxy_config())
        check = subprocess.run(
            [HAPROXY, "-c", "-f", str(haproxy_cfg)], capture_output=True, text=True, timeout=TIMEOUT
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.balancer = LiveProcess([HAPROXY, "-db", "-f", str(haproxy_cfg)])
        wait_listening(self.port)

    def _config(self, name: str) -> Path:
        return write_config(
            self.root / name,
            # One deploy at a time per node, so that a test can tell which node runs one.
            deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], "max_parallel": 1},
            cluster={"node_name": f"node-{name}", "node_timeout": 3},
            storage={
                "database": self.database,
                "repos": str(self.root / "repos"),
                "control_socket": str(self.root / name / "gw.sock"),
            },
            ssh={
                "host_key_dir": str(self.root / "hostkeys"),
                # optional: the balancer's connections carry PROXY headers; the tests also
                # reach each node directly (both as in a real cluster's health checks).
                "proxy_protocol": "optional",
                "proxy_allowed": ["127.0.0.1/32"],
            },
        )

    def _haproxy_config(self) -> str:
        """The committed example with this machine's addresses, one line per node."""
        a, b = self.nodes["a"], self.nodes["b"]
        text = (ROOT / "config" / "haproxy.cfg").read_text()
        replacements = {
            "log stdout format raw local0": "log stderr format raw local0",
            "bind :22": f"bind 127.0.0.1:{self.port}",
            "inter 2s": "inter 300ms",
            "server gw1 10.0.0.11:2222": f"server gw1 127.0.0.1:{a.port} port {http_port(a)}",
            "server gw2 10.0.0.12:2222": f"server gw2 127.0.0.1:{b.port} port {http_port(b)}",
        }
        for old, new in replacements.items():
            assert old in text, f"config/haproxy.cfg no longer has {old!r}"
            text = text.replace(old, new)
        return text

    def restart(self, name: str) -> ServeProcess:
        """Start a node again (on a new port: tests reach it directly, not through HAProxy)."""
        self.nodes[name] = self._serve(name)
        return self.nodes[name]

    def _serve(self, name: str) -> ServeProcess:
        """A node as in production: a supervisor and its workers (two here)."""
        return ServeProcess(self.configs[name], args=("--workers", "2"))

    def client(self, name: str, key: Path, home: Path) -> Client:
        return Client(home, key, Balanced(self.nodes["a"], self.port), name=name)  # type: ignore[arg-type]

    def close(self) -> None:
        self.balancer.kill()
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if not Path(HAPROXY).exists():
        if REQUIRED:
            pytest.fail("haproxy is not installed")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    database_server = pg.PostgresServer(pg.require_postgres()).start()
    cluster = None
    try:
        cluster = Cluster(tmp_path, database_server.create_database(), database_server)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        database_server.remove()


def logins(node: ServeProcess) -> float:
    """Successful logins a node counted (its own /metrics)."""
    text = http("GET", f"http://127.0.0.1:{http_port(node)}/metrics").body.decode()
    match = re.search(r'^gateway_auth_results_total\{result="ok"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_one_gateway_behind_the_balancer(cluster: Cluster, tmp_path: Path) -> None:
    """Pushes and clones through HAProxy land on both nodes, which serve the same data."""
    admin = Admin(cluster.configs["a"])
    key = admin.enroll("pia", tmp_path, "web")
    client = cluster.client("pia", key, tmp_path / "home")
    work = client.new_repo(tmp_path / "work", {"README": "through the balancer\n"})
    client.git("push", "-q", client.url("web"), "main", cwd=work)
    for index in range(6):  # leastconn spreads sequential connections over both nodes
        copy = tmp_path / f"copy{index}"
        client.git("clone", "-q", client.url("web"), str(copy))
        assert (copy / "README").read_text() == "through the balancer\n"
    assert all(logins(node) > 0 for node in cluster.nodes.values())  # both nodes served


def test_node_killed_mid_push_leaves_old_or_new(cluster: Cluster, tmp_path: Path) -> None:
    """Node A is SIGKILLed while a push streams through it: the branch is the old commit or
    the new one, the repository passes fsck, and node B goes on serving."""
    admin = Admin(cluster.configs["a"])
    key = admin.enroll("kim", tmp_path, "big")
    a = cluster.nodes["a"]
    direct = Client(tmp_path / "home-a", key, a, name="kim")
    work = direct.new_repo(tmp_path / "work")
    direct.git("push", "-q", direct.url("big"), "main", cwd=work)
    old = direct.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    (work / "blob").write_bytes(os.urandom(24 * 1024 * 1024))  # incompressible: a long push
    direct.git("add", "blob", cwd=work)
    direct.git("commit", "-q", "-m", "big", cwd=work)
    new = direct.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    push = LiveProcess(
        ["git", "push", "--progress", direct.url("big"), "main"], env=direct.env, cwd=work
    )
    push.wait_for(r"Writing objects:\s+\d+%")
    kill_node(a)
    push.finish()
    repo = cluster.root / "repos" / "big.git"
    assert server_refs(repo)["refs/heads/main"] in (old, new)
    fsck(repo)
    # The balancer takes A out; B serves the same repository through it.
    cluster.balancer.wait_for(r"Server gateways/gw1 is DOWN")
    client = cluster.client("kim", key, tmp_path / "home")
    listed = client.git("ls-remote", client.url("big")).stdout
    assert server_refs(repo)["refs/heads/main"] in listed


async def test_database_restart_under_load(cluster: Cluster, tmp_path: Path) -> None:
    """PostgreSQL restarts while a clone runs: the clone finishes (it needs the registry
    only to start), new logins get one clear line meanwhile, and work again after."""
    admin = Admin(cluster.configs["a"])
    key = await asyncio.to_thread(admin.enroll, "lou", tmp_path, "busy")
    a = cluster.nodes["a"]
    direct = Client(tmp_path / "home-a", key, a, name="lou")
    work = await asyncio.to_thread(direct.new_repo, tmp_path / "work")
    await asyncio.to_thread(direct.git, "push", "-q", direct.url("busy"), "main", cwd=work)
    async with ssh_connect(a.port, key) as conn:
        # A clone in progress: upload-pack has advertised its refs and waits for the client.
        clone = await conn.create_process("git-upload-pack 'busy.git'", encoding=None)
        advertised = await asyncio.wait_for(clone.stdout.readuntil(b"0000"), TIMEOUT)
        head = re.search(rb"([0-9a-f]{40}) HEAD", advertised)
        assert head is not None
        await asyncio.to_thread(cluster.database_server.stop)
        try:
            with pytest.raises(asyncssh.DisconnectError, match="temporarily unavailable"):
                async with ssh_connect(a.port, key):
                    pass
            # The clone goes on and gets its pack.
            want = b"want " + head.group(1) + b"\n"
            clone.stdin.write(b"%04x" % (len(want) + 4) + want + b"00000009done\n")
            pack = await asyncio.wait_for(clone.stdout.read(), TIMEOUT)
            assert b"PACK" in pack
            assert (await asyncio.wait_for(clone.wait(), TIMEOUT)).exit_status == 0
        finally:
            await asyncio.to_thread(cluster.database_server.start)
    # Straight to the node: the balancer took both nodes out while their /readyz said the
    # registry was down, and puts them back only after its health checks' `rise`.
    result = await asyncio.to_thread(direct.git, "ls-remote", direct.url("busy"))
    assert result.returncode == 0


def kill_node(node: ServeProcess) -> None:
    """SIGKILL a whole node at once, its supervisor and every worker (a machine that dies:
    nobody gets to record anything)."""
    workers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == node.proc.pid:
                workers.append(int(entry.name))
    for pid in [node.proc.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.proc.wait(TIMEOUT)


def release(fifo: Path) -> None:
    with open(fifo, "w") as gate:
        gate.write("go\n")


def blocking_repo(client: Client, work: Path, name: str) -> Path:
    """A repository whose deploy waits on a FIFO; the FIFO's path."""
    fifo = exchange_subdir(name) / "gate.fifo"
    os.mkfifo(fifo)
    client.new_repo(work, {"wait-fifo": str(fifo)})
    return fifo


def test_a_deploy_runs_on_another_node_and_streams_to_the_pusher(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Node A is busy (max_parallel 1), so a push through A is deployed by node B: the
    pusher sees B's output live, `logs --follow` through either node streams it too."""
    admin = Admin(cluster.configs["a"])
    key = admin.enroll("ada", tmp_path, "hold", "web")
    cluster.nodes["b"].stop()  # only A can take the first deploy
    a = cluster.nodes["a"]
    via_a = Client(tmp_path / "home-a", key, a, name="ada")
    hold_fifo = blocking_repo(via_a, tmp_path / "hold", "hold")
    hold = LiveProcess(
        ["git", "push", via_a.url("hold"), "main"], env=via_a.env, cwd=tmp_path / "hold"
    )
    hold.wait_for(r"waiting for the test")
    b = cluster.restart("b")
    fifo = blocking_repo(via_a, tmp_path / "web", "web")
    push = LiveProcess(
        ["git", "push", via_a.url("web"), "main"], env=via_a.env, cwd=tmp_path / "web"
    )
    started = b.wait_for(r"event=deploy_started deploy=(\d+) app=web ")
    deploy_id = started.group(1)
    push.wait_for(r"remote: waiting for the test")  # B's output, through A, live
    via_b = Client(tmp_path / "home-b", key, b, name="ada")
    followers = [
        LiveProcess(
            [*client.ssh_base, "-T", "git@127.0.0.1", "logs", "web", deploy_id, "--follow"],
            env=client.env,
        )
        for client in (via_a, via_b)
    ]
    for follower in followers:
        follower.wait_for_stdout(r"waiting for the test")
    release(fifo)
    assert push.finish() == 0
    assert "released by the test" in push.stderr and f"deploy #{deploy_id} succeeded" in push.stderr
    for follower in followers:
        assert follower.finish() == 0
        assert "released by the test\n" in follower.stdout
        assert any(f"deploy #{deploy_id} succeeded" in line for line in follower.stdout)
    assert f"event=deploy_started deploy={deploy_id} " not in a.stderr
    release(hold_fifo)
    assert hold.finish() == 0


def test_a_node_killed_mid_deploy_is_noticed_and_the_queue_goes_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Node A is SIGKILLed while it runs a deploy: node B marks that deploy interrupted
    within node_timeout (3 s here) and runs the app's next deploy, pushed through B while
    A's was running; its pusher, waiting on B, sees it succeed."""
    admin = Admin(cluster.configs["a"])
    key = admin.enroll("kit", tmp_path, "web")
    cluster.nodes["b"].stop()
    a = cluster.nodes["a"]
    via_a = Client(tmp_path / "home-a", key, a, name="kit")
    blocking_repo(via_a, tmp_path / "work", "killed")
    first = LiveProcess(
        ["git", "push", via_a.url("web"), "main"], env=via_a.env, cwd=tmp_path / "work"
    )
    first.wait_for(r"waiting for the test")
    b = cluster.restart("b")
    via_b = Client(tmp_path / "home-b", key, b, name="kit")
    via_b.commit(tmp_path / "work", {"wait-fifo": ""}, "next")
    (tmp_path / "work" / "wait-fifo").unlink()
    via_b.commit(tmp_path / "work", {}, "no fifo")
    second = LiveProcess(
        ["git", "push", via_b.url("web"), "main"], env=via_b.env, cwd=tmp_path / "work"
    )
    second.wait_for(r"queued behind #1")
    kill_node(a)
    first.finish()
    b.wait_for(r"event=deploy_interrupted deploy=1 app=web")
    assert second.finish() == 0
    assert "deploy #2 succeeded" in second.stderr
    listed = Admin(cluster.configs["b"]).ok("deploy", "list", "web")
    assert "interrupted" in listed and "succeeded" in listed
