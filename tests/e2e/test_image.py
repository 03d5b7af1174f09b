"""The container image, built by scripts/build-image and run by root podman as CI runs it.

runc, cgroupfs, no default ulimits and `--network host` (crun refuses this machine's hybrid
cgroup setup), from a containers.conf the test writes. The gateway in the container gets its
ports from a config file mounted over the image's; users, keys and apps are added with
`podman exec`; pushes, deploys and clones go through the container's port. Set
GATEWAY_TEST_IMAGE to an image built earlier to skip the build (about 3 minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Client, LiveProcess, keygen, run

# The first test builds the image (about 3 minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"  # CI installs them: never skip
TOOLS = {"podman": "podman", "buildah": "buildah", "runc": "runc", "mmdebstrap": "mmdebstrap"}
# What bubblewrap needs in a container (docs/container.md), and the hardening that goes with
# it: the gateway needs no capability at all.
SANDBOX_FLAGS = [
    *("--security-opt", "seccomp=unconfined", "--security-opt", "unmask=/proc/*"),
    *("--device", "/dev/net/tun"),  # pasta, for the deploys' isolated network
]
HARDENING = ["--cap-drop=all", "--security-opt", "no-new-privileges"]
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"""
DEPLOY = """\
#!/bin/sh
echo "deploy uid=$(id -u) cwd=$(pwd)"
ls -l
for path in /data /etc/git-gateway /opt/git-gateway /run/.containerenv; do
    if [ -e "$path" ]; then echo "visible: $path"; else echo "hidden: $path"; fi
done
if [ -e slow ]; then
    echo "slow deploy waiting"
    # The test lets it finish once the gateway has logged that it drains.
    while [ ! -e /exchange/go ]; do sleep 0.1; done
fi
echo "deploy done"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    missing = sorted(
        package
        for tool, package in TOOLS.items()
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
    )
    if missing or os.geteuid() != 0:
        reason = (
            f"apt-get install {' '.join(missing)}" if missing else "root podman (as CI runs it)"
        )
        if REQUIRED:
            pytest.fail(f"the image test needs {reason}")
        pytest.skip(f"the image test needs {reason}")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> Iterator[str]:
    """The image scripts/build-image makes (removed afterwards), or GATEWAY_TEST_IMAGE."""
    given = os.environ.get("GATEWAY_TEST_IMAGE")
    if given:
        yield given
        return
    tag = f"localhost/gateway-test-{uuid.uuid4().hex[:12]}:1"
    env = {**podman_env, "PYTHON": sys.executable}
    result = run([str(ROOT / "scripts" / "build-image"), "--tag", tag], env=env, timeout=900)
    assert result.returncode == 0, f"build-image failed:\n{result.stdout}\n{result.stderr}"
    size = int(re.search(r"compressed size: (\d+) bytes", result.stdout).group(1))  # type: ignore[union-attr]
    assert size <= 120_000_000, f"the image is {size} bytes compressed (target: 120 MB)"
    try:
        yield tag
    finally:
        run(["podman", "rmi", "--force", tag], env=podman_env)


@dataclass
class Container:
    """One gateway container: what Client needs of a server (port, host keys), and podman."""

    name: str
    port: int
    http_port: int
    exchange: Path
    env: dict[str, str]
    process: LiveProcess | None = None

    def podman(self, *args: str, input: str | None = None, timeout: float = 60):  # type: ignore[no-untyped-def]
        return run(["podman", *args], env=self.env, input=input, timeout=timeout)

    def exec(self, *argv: str, input: str | None = None) -> str:
        result = self.podman("exec", "-i", self.name, *argv, input=input)
        assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
        return result.stdout

    def known_hosts(self, path: Path) -> Path:
        keys = self.exec("sh", "-c", "cat /data/host_keys/*.pub").splitlines()
        lines = [f"[127.0.0.1]:{self.port} {' '.join(k.split()[:2])}" for k in keys if k]
        path.write_text("\n".join(lines) + "\n")
        return path


def container_config(path: Path, port: int, http_port: int) -> Path:
    """The image's own config with this test's ports (host network: loopback only) and a
    deploy command from the pushed tree, which may wait on the exchange directory."""
    text = (ROOT / "config" / "container.toml").read_text()
    replacements = {
        'listen = "0.0.0.0:2222"': f'listen = "127.0.0.1:{port}"',
        'listen = "0.0.0.0:8080"': f'listen = "127.0.0.1:{http_port}"',
        "[deploy]\n": '[deploy]\ncommand = ["./deploy"]\nsandbox_read_paths = ["/exchange"]\n',
    }
    for old, new in replacements.items():
        assert old in text, f"config/container.toml no longer has {old!r}"
        text = text.replace(old, new)
    # No balancer to tell: the listener may close a second after SIGTERM rather than five.
    text += "\n[server]\ndrain_accept_seconds = 1\n"
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def container(
    image: str, podman_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    directory = tmp_path_factory.mktemp("container")
    directory.chmod(0o755)
    exchange = directory / "exchange"
    exchange.mkdir(mode=0o755)
    suffix = uuid.uuid4().hex[:12]
    box = Container(f"gateway-test-{suffix}", free_port(), free_port(), exchange, podman_env)
    config = container_config(directory / "gateway.toml", box.port, box.http_port)
    volume = f"gateway-test-data-{suffix}"
    assert box.podman("volume", "create", volume).returncode == 0
    box.process = LiveProcess(
        [
            "podman", "run", "--name", box.name, "--network", "host",
            *SANDBOX_FLAGS, *HARDENING,
            "-v", f"{volume}:/data",
            "-v", f"{config}:/etc/git-gateway/gateway.toml:ro",
            "-v", f"{exchange}:/exchange:ro",
            image,
        ],
        env=podman_env,
    )  # fmt: skip
    try:
        box.process.wait_for(rf"event=listening address=127\.0\.0\.1:{box.port}\b")
        yield box
    finally:
        box.podman("rm", "--force", "--time", "0", box.name)
        box.podman("volume", "rm", "--force", volume)
        if box.process.proc.poll() is None:
            box.process.kill()


@pytest.fixture(scope="module")
def alice(container: Container, tmp_path_factory: pytest.TempPathFactory) -> Client:
    """A user, her key and her app, added with `podman exec` (the CLI in the container)."""
    home = tmp_path_factory.mktemp("alice")
    key = keygen(home / "id_ed25519")
    container.exec("git-gateway", "user", "add", "alice")
    public = Path(f"{key}.pub").read_text()
    container.exec("git-gateway", "key", "add", "alice", "laptop", "-", input=public)
    container.exec("git-gateway", "app", "create", "web", "--owner", "alice")
    return Client(home / "home", key, container, name="alice")  # type: ignore[arg-type]


def app_repo(alice: Client, path: Path) -> Path:
    """The app's first commit (the same commit each time: dates are fixed): its deploy
    program, executable."""
    alice.git("init", "-q", "-b", "main", str(path))
    (path / "deploy").write_text(DEPLOY)
    (path / "deploy").chmod(0o755)
    alice.commit(path, {"README": "hello\n"}, "first")
    return path


def test_regression_image_runs_unprivileged(container: Container) -> None:
    """Every process of the container is uid 10001, podman exec too: never root."""
    users = container.podman("top", container.name, "user", "args")
    assert users.returncode == 0, users.stderr
    rows = [line.split(None, 1) for line in users.stdout.splitlines()[1:] if line.strip()]
    assert rows and all(user == "gateway" for user, _ in rows), users.stdout
    assert any("git-gateway serve" in args for _, args in rows), users.stdout
    assert container.exec("id", "-u").strip() == "10001"
    # Its state is private to it; its code and config are not its to change.
    owners = container.exec("stat", "-c", "%a %u %n", "/data", "/data/gateway.db").splitlines()
    assert owners == ["700 10001 /data", "600 10001 /data/gateway.db"]
    for path in ("/opt/git-gateway/bin", "/etc/git-gateway"):
        touched = container.podman("exec", container.name, "touch", f"{path}/planted")
        assert touched.returncode != 0 and "Permission denied" in touched.stderr, path


def test_regression_image_deploy_sees_no_state(
    container: Container, alice: Client, tmp_path: Path
) -> None:
    """A push deploys in bubblewrap inside the container: the deploy runs as the gateway's
    uid but sees neither the /data volume (registry, host keys, every tenant's repository)
    nor the gateway's config and code; the clone through the container's port is the push."""
    repo = app_repo(alice, tmp_path / "web")
    pushed = alice.git("push", alice.url("web"), "main", cwd=repo)
    out = pushed.stderr
    assert "remote: deploy uid=10001 cwd=/app" in out, out
    assert re.search(r"remote: -rwx.* deploy", out), out
    for path in ("/data", "/etc/git-gateway", "/opt/git-gateway", "/run/.containerenv"):
        assert f"remote: hidden: {path}" in out, out
    assert "remote: deploy done" in out and "deploy #1 succeeded" in out, out
    clone = tmp_path / "clone"
    alice.git("clone", "-q", alice.url("web"), str(clone))
    head = alice.git("rev-parse", "HEAD", cwd=repo).stdout
    assert alice.git("rev-parse", "HEAD", cwd=clone).stdout == head
    assert (clone / "deploy").read_text() == DEPLOY


def test_image_ready_and_healthy(container: Container) -> None:
    """/readyz answers through the container's port, and the image's HEALTHCHECK passes."""
    url = f"http://127.0.0.1:{container.http_port}/readyz"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
    health = container.podman("healthcheck", "run", container.name)
    assert health.returncode == 0, f"{health.stdout}{health.stderr}"
    state = container.podman("inspect", container.name, "--format", "{{.State.Health.Status}}")
    assert state.stdout.strip() == "healthy", state.stdout + state.stderr


def wait_draining(log: LiveProcess) -> None:
    """Until the workers have closed their listeners with the push's session and its deploy
    still running (the deploy may run in another worker than the session)."""
    sessions = deploys = 0
    while not (sessions and deploys):
        found = log.wait_for(r"event=listener_closed .*sessions=(\d+) deploys=(\d+)")
        sessions, deploys = sessions + int(found.group(1)), deploys + int(found.group(2))


def test_image_drains_on_sigterm(container: Container, alice: Client, tmp_path: Path) -> None:
    """`podman stop` (SIGTERM): the gateway stops accepting but lets the running push and its
    deploy finish, then the container exits 0. Runs last: it stops the container."""
    repo = app_repo(alice, tmp_path / "web")
    alice.commit(repo, {"slow": "1\n"}, "slow deploy")
    push = LiveProcess(["git", "push", alice.url("web"), "main"], env=alice.env, cwd=repo)
    stop: subprocess.Popen[str] | None = None
    try:
        push.wait_for(r"remote: slow deploy waiting")
        stop = subprocess.Popen(
            ["podman", "stop", "--time", "90", container.name],
            env=container.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert container.process is not None
        wait_draining(container.process)
        (container.exchange / "go").touch()
        assert push.finish() == 0, push.stderr
        assert "remote: deploy done" in push.stderr, push.stderr
        assert re.search(r"deploy #\d+ succeeded", push.stderr), push.stderr
        assert stop.wait(120) == 0, stop.communicate()[0]
    finally:
        if push.proc.poll() is None:
            push.kill()
        if stop is not None and stop.poll() is None:
            stop.kill()
    assert container.process.finish(60) == 0, container.process.stderr
    assert re.search(r"event=stopped workers=\d+ failed=0", container.process.stderr)
    code = container.podman("inspect", container.name, "--format", "{{.State.ExitCode}}")
    assert code.stdout.strip() == "0", code.stdout + code.stderr


def test_regression_image_check_without_sandbox_flags(
    image: str, podman_env: dict[str, str], tmp_path: Path
) -> None:
    """Without the sandbox flags, `check` (and `serve`) refuse in one line naming them, not
    with bwrap's bare error or a traceback; deploys never run unsandboxed."""
    tmp_path.chmod(0o755)
    config = container_config(tmp_path / "gateway.toml", free_port(), free_port())
    result = run(
        [
            "podman", "run", "--rm", "--network", "host", *HARDENING,
            "--device", "/dev/net/tun",  # pasta's, so that bubblewrap's refusal comes first
            "-v", f"{config}:/etc/git-gateway/gateway.toml:ro",
            image, "check",
        ],
        env=podman_env,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "deploy sandbox cannot be built" in errors[0]
    assert "--security-opt seccomp=unconfined --security-opt unmask=/proc/*" in errors[0]
    assert "Traceback" not in result.stderr
