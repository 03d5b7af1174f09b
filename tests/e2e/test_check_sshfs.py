"""`git-gateway check` on a repositories root that is a real sshfs mount (issue 22's setup),
served by OpenSSH's sftp-server on a loopback socket (sshfs -o directport: no sshd needed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run, write_config

SFTP_SERVERS = ["/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server"]


def sftp_server() -> str | None:
    return next((path for path in SFTP_SERVERS if os.access(path, os.X_OK)), None)


def serve_sftp_once(listener: socket.socket, server: str) -> None:
    """Give the one connection sshfs makes to an sftp-server; it ends when sshfs unmounts."""
    listener.settimeout(30)
    try:
        conn, _ = listener.accept()
    except OSError:  # the test gave up, or closed the socket after a failed mount
        return
    with conn:
        process = subprocess.Popen([server], stdin=conn, stdout=conn, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def sshfs_root(tmp_path: Path) -> Iterator[Path]:
    server = sftp_server()
    unmount = shutil.which("fusermount3") or shutil.which("fusermount")
    if not (shutil.which("sshfs") and server and unmount and os.access("/dev/fuse", os.W_OK)):
        pytest.skip("needs sshfs, fusermount and OpenSSH's sftp-server, and /dev/fuse")
    shared, mount = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mount.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=serve_sftp_once, args=(listener, server), daemon=True)
        thread.start()
        argv = ["sshfs", "-o", f"directport={port}", f"127.0.0.1:{shared}", str(mount)]
        mounted = run(argv, timeout=30)
        if mounted.returncode != 0:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
            thread.join(timeout=30)
            pytest.skip(f"cannot mount sshfs here: {mounted.stderr.strip()}")
        try:
            yield mount
        finally:
            run([unmount, "-u", str(mount)], timeout=30, check=True)
            thread.join(timeout=30)


def check(config: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(config.parent)}
    result = run([sys.executable, "-m", "gateway", "--config", str(config), "check"], env=env)
    assert result.returncode == 0, result.stderr
    return result


def test_check_on_a_real_sshfs_root(tmp_path, sshfs_root):
    (sshfs_root / "probe").write_text("through sftp")
    assert (tmp_path / "shared" / "probe").read_text() == "through sftp"
    state = tmp_path / "state"
    alone = check(write_config(state, storage={"repos": str(sshfs_root)}))
    [warning] = [line for line in alone.stdout.splitlines() if line.startswith("warning:")]
    assert warning.startswith(
        f"warning: [storage] repos ({sshfs_root}) is on a network filesystem (fuse.sshfs) and "
        "[cluster] listen is not set: "
    )
    internal = {"node_timeout": 4, "listen": "127.0.0.1:0", "peers": ["127.0.0.1/32"]}
    forwarding = check(
        write_config(state, storage={"repos": str(sshfs_root)}, cluster=internal)
    ).stdout
    assert "warning:" not in forwarding
    assert "repositories ok (fuse.sshfs: each repository served by its home node)\n" in forwarding
    local = check(write_config(state, storage={"repos": str(tmp_path / "shared")})).stdout
    assert "warning:" not in local and "repositor" not in local
