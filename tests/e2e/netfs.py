"""A network filesystem stand-in: one directory served by a private OpenSSH sshd and mounted
twice with sshfs, with sshfs's default caching, as two machines would mount one export."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import LiveProcess, keygen, run

SSHD = "/usr/sbin/sshd"
REQUIRED = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"  # CI installs sshfs: never skip
TIMEOUT = 30


@dataclass(frozen=True)
class NetworkFS:
    """The exported directory and its two mounts (each one "machine"'s view of it)."""

    shared: Path
    a: Path
    b: Path


def missing_tools() -> str | None:
    """Why the stand-in cannot run here (None: it can)."""
    if shutil.which("sshfs") is None or shutil.which("fusermount3") is None:
        return "sshfs is not installed (apt-get install sshfs)"
    if not os.access(SSHD, os.X_OK):
        return "sshd is not installed (apt-get install openssh-server)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (FUSE is not available here)"
    return None


def require_netfs() -> None:
    """Skip without the tools; fail in CI, where GATEWAY_REQUIRE_TOOLS=1."""
    reason = missing_tools()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"{reason}: required in CI")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_sshd(state: Path, client_pub: Path) -> LiveProcess:
    """sshd on 127.0.0.1 that lets the client key in with sftp (sshfs's protocol) only."""
    if os.geteuid() == 0:
        # Created by the service's init script, which a private sshd does not run.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key = keygen(state / "ssh_host_ed25519_key")
    authorized = state / "authorized_keys"
    authorized.write_text(client_pub.read_text())
    authorized.chmod(0o600)
    failures = []
    for _ in range(5):  # sshd cannot bind port 0: pick one, retry if someone took it first
        port = free_port()
        config = state / "sshd_config"
        config.write_text(
            f"Port {port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\n"
            f"PidFile {state / 'sshd.pid'}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel INFO\n"
        )
        sshd = LiveProcess([SSHD, "-D", "-e", "-f", str(config)])
        try:
            sshd.wait_for(rf"Server listening on 127\.0\.0\.1 port {port}\b", TIMEOUT)
        except AssertionError:  # it exited: the port was taken, or the config is wrong
            sshd.finish(TIMEOUT)
            failures.append(sshd.stderr)
            continue
        sshd.port = port  # type: ignore[attr-defined]
        return sshd
    raise AssertionError("sshd did not start:\n" + "\n".join(failures))


def mount(port: int, key: Path, shared: Path, point: Path) -> None:
    """sshfs with its default caching: only what logging in needs."""
    point.mkdir(parents=True)
    run(
        [
            "sshfs",
            f"{pwd.getpwuid(os.getuid()).pw_name}@127.0.0.1:{shared}",
            str(point),
            *("-p", str(port)),
            *("-o", f"IdentityFile={key}"),
            *("-o", "StrictHostKeyChecking=no"),
            *("-o", "UserKnownHostsFile=/dev/null"),
            *("-o", "BatchMode=yes"),
        ],
        check=True,
        timeout=TIMEOUT,
    )
    if not os.path.ismount(point):
        raise AssertionError(f"sshfs returned but {point} is not a mount point")


def unmount(point: Path) -> None:
    """fusermount3 -u, or lazily when something still holds the mount."""
    if not os.path.ismount(point):
        return
    if run(["fusermount3", "-u", str(point)], timeout=TIMEOUT).returncode != 0:
        run(["fusermount3", "-u", "-z", str(point)], timeout=TIMEOUT, check=True)


def stop(sshd: LiveProcess) -> None:
    if sshd.proc.poll() is None:
        sshd.proc.terminate()
        try:
            sshd.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            sshd.kill()


def network_fs(root: Path) -> Iterator[NetworkFS]:
    """The stand-in under `root` (local disk): root/shared exported, mounted at root/a and
    root/b; unmounted and stopped when the generator closes."""
    require_netfs()
    state = root / "sshd"
    state.mkdir(mode=0o700)
    key = keygen(state / "client_id")
    shared = root / "shared"
    shared.mkdir()
    sshd = start_sshd(state, Path(f"{key}.pub"))
    points: list[Path] = []
    try:
        for name in ("a", "b"):
            points.append(root / name)
            mount(sshd.port, key, shared, points[-1])  # type: ignore[attr-defined]
        yield NetworkFS(shared, root / "a", root / "b")
    finally:
        try:
            for point in points:
                unmount(point)
        finally:
            stop(sshd)


@pytest.fixture(scope="module", name="netfs")
def netfs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkFS]:
    """One stand-in for a test module (use: `from tests.e2e.netfs import netfs_fixture`)."""
    yield from network_fs(tmp_path_factory.mktemp("netfs"))
