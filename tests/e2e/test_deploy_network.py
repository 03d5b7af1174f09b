"""A deploy's network, with the real bubblewrap and pasta: `isolated` (the default) reaches
nothing of the host's loopback, abstract unix sockets or /proc/net; `none` has no route out;
`host` is the host's network; pasta never outlives the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import config
from gateway.deploys import builddir, sandbox
from tests.helpers import (
    DEPLOY_PYTHON,
    PIPELINE,
    ServeProcess,
    require_sandbox,
    run,
    sandbox_settings,
    write_config,
)

pytestmark = pytest.mark.skipif(shutil.which("pasta") is None, reason="needs pasta (passt)")

# What the deploy tries, reported as JSON: each attempt "ALLOWED ..." or "denied: ...".
PROBE = r"""
import json, socket, sys
targets = json.loads(sys.argv[1])
def attempt(action):
    try:
        return "ALLOWED " + str(action())
    except OSError as exc:
        return "denied: " + str(exc)
def tcp():
    with socket.create_connection(("127.0.0.1", targets["port"]), timeout=5) as conn:
        return conn.recv(64)
def abstract():
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect("\0" + targets["abstract"])
        return conn.recv(64)
def route():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as conn:
        conn.connect(("192.0.2.77", 9))  # no packet is sent: only the route is looked up
        return conn.getsockname()
found = {
    "tcp": attempt(tcp),
    "abstract": attempt(abstract),
    "listed": targets["abstract"] in open("/proc/net/unix").read(),
    "route": attempt(route),
}
print(json.dumps(found))
"""


def settings(tmp_path: Path, mode: str) -> config.DeploySettings:
    require_sandbox()
    deploy = {"command": ["true"], "network": mode, **sandbox_settings(tmp_path)}
    return config.from_mapping({"deploy": deploy}).deploy


async def _in_sandbox(box: sandbox.Sandbox, argv: list[str], build: Path) -> tuple[int, str]:
    await sandbox.probe(box, build)
    export = await asyncio.to_thread(sandbox._make_probe_dir, build, box)
    try:
        proc = await box.spawn(
            argv,
            export_dir=export,
            env={"PATH": sandbox.SANDBOX_PATH},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await asyncio.to_thread(builddir.remove_tree, export)
    return proc.returncode or 0, out.decode("utf-8", "replace")


def deploy_probe(tmp_path: Path, mode: str) -> dict:
    """Run PROBE in a real sandbox with `mode`, against a TCP listener on the host's
    127.0.0.1 and an abstract unix socket this test opens."""
    name = f"gateway-test-{secrets.token_hex(6)}"
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        unix.bind("\0" + name)
        unix.listen()
        greeter = _Greeter(tcp, unix)
        cfg = settings(tmp_path, mode)
        box = sandbox.Sandbox.of(cfg)
        targets = json.dumps({"port": tcp.getsockname()[1], "abstract": name})
        code, out = asyncio.run(
            _in_sandbox(box, [DEPLOY_PYTHON, "-c", PROBE, targets], cfg.build_dir)
        )
        greeter.stop()
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


class _Greeter:
    """Answers every connection on the test's listeners with a greeting, on a thread."""

    def __init__(self, *listeners: socket.socket) -> None:
        import threading

        self.listeners = listeners
        self.done = threading.Event()
        for listener in listeners:
            listener.settimeout(0.2)
            threading.Thread(target=self._serve, args=(listener,), daemon=True).start()

    def _serve(self, listener: socket.socket) -> None:
        while not self.done.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.sendall(b"host secret")

    def stop(self) -> None:
        self.done.set()


def test_regression_isolated_deploy_reaches_nothing_of_the_host(tmp_path):
    found = deploy_probe(tmp_path, "isolated")
    assert found["tcp"].startswith("denied"), found  # the gateway's HTTP, /metrics, PostgreSQL
    assert found["abstract"].startswith("denied"), found
    assert found["listed"] is False  # the host's /proc/net/unix is not the deploy's
    assert found["route"].startswith("ALLOWED"), found  # a default route, through pasta


def test_regression_default_network_is_isolated(tmp_path):
    require_sandbox()
    deploy = {"command": ["true"], **sandbox_settings(tmp_path)}
    assert config.from_mapping({"deploy": deploy}).deploy.network == "isolated"
    found = deploy_probe(tmp_path, "isolated")
    assert found["tcp"].startswith("denied")


def test_regression_none_has_no_route_out(tmp_path):
    found = deploy_probe(tmp_path, "none")
    assert found["route"].startswith("denied"), found
    assert found["tcp"].startswith("denied") and found["abstract"].startswith("denied")
    assert found["listed"] is False


def test_host_network_is_the_hosts(tmp_path):
    found = deploy_probe(tmp_path, "host")
    assert found["tcp"] == "ALLOWED b'host secret'", found
    assert found["abstract"] == "ALLOWED b'host secret'", found
    assert found["listed"] is True


def test_isolated_deploy_exit_codes_pass_through_pasta(tmp_path):
    cfg = settings(tmp_path, "isolated")
    box = sandbox.Sandbox.of(cfg)
    code, out = asyncio.run(_in_sandbox(box, ["sh", "-c", "id -u; exit 7"], cfg.build_dir))
    assert code == 7
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert out.strip() == str(uid)  # the sandbox user, not pasta's namespace root


# A stand-in for the gateway: starts one isolated sandbox, says its first process's pid, and
# waits (pasta is found by the test among the processes that appeared).
GATEWAY = r"""
import asyncio, json, sys
from pathlib import Path
from gateway import config
from gateway.deploys import sandbox
async def main():
    cfg = config.from_mapping({"deploy": json.loads(sys.argv[1])}).deploy
    box = sandbox.Sandbox.of(cfg)
    await sandbox.probe(box, cfg.build_dir)
    export = sandbox._make_probe_dir(cfg.build_dir, box)
    env = {"PATH": sandbox.SANDBOX_PATH}
    proc = await box.spawn(["sleep", sys.argv[2]], export_dir=export, env=env)
    print(proc.pid, flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_regression_pasta_dies_with_a_killed_gateway(tmp_path):
    """SIGKILL of the gateway while a deploy runs: bubblewrap dies with its parent, the
    deploy with it, and pasta (joined to the sandbox's namespace, in the background) exits
    with the namespace."""
    require_sandbox()
    marker = str(3000 + secrets.randbelow(5000))
    deploy = {"command": ["true"], "network": "isolated", **sandbox_settings(tmp_path)}
    before = _pastas()
    gateway = subprocess.Popen(
        [sys.executable, "-c", GATEWAY, json.dumps(deploy), marker],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert gateway.stdout is not None
        sandbox_pid = int(gateway.stdout.readline())
        deadline = time.monotonic() + 30
        while not _command_with(f"sleep\0{marker}") and time.monotonic() < deadline:
            time.sleep(0.05)  # no event says that the deploy's command started
        assert _alive(sandbox_pid) and _command_with(f"sleep\0{marker}")
        pastas = _pastas() - before
        assert pastas, "no pasta relays the running deploy's network"
    finally:
        gateway.kill()
        gateway.wait(10)
    deadline = time.monotonic() + 10
    while (
        any(map(_alive, pastas)) or _command_with(f"sleep\0{marker}")
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, pastas)), "pasta outlived the gateway"
    assert not _command_with(f"sleep\0{marker}"), "the deploy outlived the gateway"


def _pastas() -> set[int]:
    """PIDs of the pasta processes running now."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if argv0.endswith(b"pasta") and _alive(int(entry.name)):
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _command_with(prefix: str) -> bool:
    """Whether a process runs this command line (from its start: not pasta naming it)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_text().startswith(prefix):
                    return True
            except OSError:
                continue
    return False


# -- start and `check` --


def gateway_cli(cfg: Path, *args: str, path: str | None = None):  # type: ignore[no-untyped-def]
    env = {"PATH": path or os.environ["PATH"], "HOME": str(cfg.parent)}
    return run([sys.executable, "-m", "gateway", "--config", str(cfg), *args], env=env)


def commanded(tmp_path: Path, ssh: dict | None = None, **deploy: object) -> Path:
    return write_config(
        tmp_path / "state",
        deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], **deploy},
        **({"ssh": ssh} if ssh else {}),
    )


BALANCER_ON_LOOPBACK = {"proxy_protocol": "required", "proxy_allowed": ["127.0.0.1/32"]}


@pytest.mark.parametrize("verb", ["check", "serve"])
def test_regression_host_network_with_a_loopback_balancer_is_refused(tmp_path, verb):
    """A deploy on the host network would connect to the SSH port from 127.0.0.1 with a
    PROXY header of its own: forged audit source, per-address limits and source-address."""
    cfg = commanded(tmp_path, ssh={"listen": "127.0.0.1:0", **BALANCER_ON_LOOPBACK})
    cfg.write_text(cfg.read_text().replace("[deploy]\n", '[deploy]\nnetwork = "host"\n', 1))
    result = gateway_cli(cfg, verb)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "[ssh] proxy_allowed trusts 127.0.0.1/32" in line
    assert '([deploy] network = "host")' in line and "own PROXY header" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "gw.sock").exists()


def test_regression_an_app_on_the_host_network_is_refused_too(tmp_path):
    cfg = commanded(tmp_path, ssh={"listen": "127.0.0.1:0", **BALANCER_ON_LOOPBACK})
    cfg.write_text(cfg.read_text() + '[apps.legacy]\nnetwork = "host"\n')
    result = gateway_cli(cfg, "check")
    assert result.returncode == 2
    assert '([apps.legacy] network = "host")' in result.stderr


def test_loopback_balancer_with_isolated_deploys_is_fine(tmp_path):
    cfg = commanded(tmp_path, ssh={"listen": "127.0.0.1:0", **BALANCER_ON_LOOPBACK})
    result = gateway_cli(cfg, "check")
    assert result.returncode == 0, result.stderr
    assert "network" not in result.stdout


def test_host_network_is_warned_about_at_check_and_start(tmp_path):
    cfg = commanded(tmp_path, network="host")
    result = gateway_cli(cfg, "check")
    assert result.returncode == 0, result.stderr
    assert 'warning: [deploy] network = "host": deploys share the host network' in result.stdout
    server = ServeProcess(cfg)
    try:
        line = next(x for x in server.lines if 'network = "host"' in x)
        assert "event=sandbox_warning" in line and "reach its loopback" in line
    finally:
        assert server.stop() == 0


def test_regression_isolated_without_pasta_is_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "prlimit", "bwrap"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    result = gateway_cli(commanded(tmp_path), "check", path=str(bin_dir))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith('error: [deploy]: deploy sandbox: network = "isolated": pasta not found')
    assert "apt-get install passt" in line and 'network = "none"' in line


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a network namespace (root)")
def test_isolated_relays_outbound_and_dns_and_reaches_the_nodes_other_addresses(tmp_path):
    """In a network (and mount) namespace this test makes, whose resolver listens on its
    loopback as systemd-resolved does: the deploy resolves a name through pasta's DNS
    forwarding, and its outbound TCP goes through pasta, arriving from the node's own
    address when it targets one of the node's other addresses, which is why `check` refuses
    a balancer list holding any of them."""
    require_sandbox()
    deploy = {"command": ["true"], "network": "isolated", **sandbox_settings(tmp_path)}
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\noptions timeout:2 attempts:1\n")
    resolv.chmod(0o644)
    argv = [sys.executable, "-c", NAMESPACE, json.dumps(deploy), str(resolv)]
    result = subprocess.run(
        ["unshare", "--net", "--mount", "--", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["other address"] == "ALLOWED from 10.77.0.5", found
    assert found["loopback"].startswith("denied"), found
    assert found["resolv.conf"] == "nameserver 169.254.0.53\noptions timeout:2 attempts:1\n"
    assert found["resolved"] == "ALLOWED from 10.77.0.5", found  # by name, through DNS


# Run in a fresh network namespace: a default route on one veth, another address on a
# second, listeners on both and on loopback; an isolated deploy tries each.
NAMESPACE = r"""
import asyncio, json, socket, subprocess, sys, threading
from gateway import config
from gateway.deploys import builddir, sandbox
for argv in (["ip", "link", "set", "lo", "up"],
             ["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1"],
             ["ip", "addr", "add", "10.99.0.2/24", "dev", "up0"],
             ["ip", "link", "set", "up0", "up"], ["ip", "link", "set", "up1", "up"],
             ["ip", "route", "add", "default", "via", "10.99.0.1"],
             ["ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1"],
             ["ip", "addr", "add", "10.77.0.5/24", "dev", "other0"],
             ["ip", "link", "set", "other0", "up"], ["ip", "link", "set", "other1", "up"],
             ["mount", "--bind", sys.argv[2], "/etc/resolv.conf"]):
    subprocess.run(argv, check=True, timeout=10)
def dns():  # a resolver on 127.0.0.53 answering every A question with 10.77.0.5
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.53", 53))
    while True:
        query, peer = server.recvfrom(512)
        end = query.index(b"\0", 12) + 5
        answer = b"\xc0\x0c\0\x01\0\x01\0\0\0\x3c\0\x04" + socket.inet_aton("10.77.0.5")
        head = query[:2] + b"\x81\x80\0\x01\0\x01\0\0\0\0"
        server.sendto(head + query[12:end] + answer, peer)
threading.Thread(target=dns, daemon=True).start()
def listen(address):
    server = socket.socket(); server.bind((address, 7001)); server.listen()
    def serve():
        while True:
            conn, peer = server.accept(); conn.sendall(f"from {peer[0]}".encode()); conn.close()
    threading.Thread(target=serve, daemon=True).start()
listen("10.77.0.5"); listen("127.0.0.1")
PROBE = '''
import json, socket
def attempt(host):
    try:
        with socket.create_connection((host, 7001), timeout=5) as conn:
            return "ALLOWED " + conn.recv(64).decode()
    except OSError as exc:
        return "denied: " + str(exc)
print(json.dumps({
    "other address": attempt("10.77.0.5"),
    "loopback": attempt("127.0.0.1"),
    "resolv.conf": open("/etc/resolv.conf").read(),
    "resolved": attempt("gateway-test.example"),
}))
'''
async def main():
    cfg = config.from_mapping({"deploy": json.loads(sys.argv[1])}).deploy
    box = sandbox.Sandbox.of(cfg)
    await sandbox.probe(box, cfg.build_dir)
    export = sandbox._make_probe_dir(cfg.build_dir, box)
    env = {"PATH": sandbox.SANDBOX_PATH}
    proc = await box.spawn(
        ["python3", "-c", PROBE], export_dir=export, env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    builddir.remove_tree(export)
    print(out.decode())
asyncio.run(main())
"""
