"""No data lost, no repository corrupted: interrupted pushes, a killed gateway, races, bad
packs, a full or read-only disk. Every test ends with `git fsck --strict` and a consistent
registry."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    TIMEOUT,
    Admin,
    Client,
    ServeProcess,
    ServerThread,
    keygen,
    race_one_round,
    run,
    server_refs,
    unique,
    write_config,
)

ZERO = "0" * 40


def strict_fsck(repo: Path) -> None:
    env = {"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    result = run(["git", "fsck", "--strict", "--full", "--no-dangling"], env=env, cwd=repo)
    assert result.returncode == 0, result.stderr


def registry_consistent(database: Path) -> None:
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def no_quarantine_left(repo: Path) -> None:
    assert list((repo / "objects").glob("tmp_objdir-incoming-*")) == []
    assert list((repo / "objects").glob("incoming-*")) == []


def object_count(repo: Path) -> int:
    env = {"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    out = run(["git", "count-objects", "-v"], env=env, cwd=repo, check=True).stdout
    fields = dict(line.split(": ") for line in out.splitlines())
    return int(fields["count"]) + int(fields["in-pack"])


def pkt(text: str) -> bytes:
    data = text.encode()
    return f"{len(data) + 4:04x}".encode() + data


def pack_of(client: Client, work: Path, objects: list[str]) -> bytes:
    result = subprocess.run(
        ["git", "pack-objects", "--stdout"],
        input="\n".join(objects).encode() + b"\n",
        cwd=work,
        env=client.env,
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    return result.stdout


def all_objects(client: Client, work: Path, rev: str = "HEAD") -> list[str]:
    out = client.git("rev-list", "--objects", rev, cwd=work).stdout
    return [line.split()[0] for line in out.splitlines()]


def big_commit(client: Client, path: Path) -> tuple[Path, str]:
    """A repository whose one commit carries 8 MB of incompressible data."""
    work = client.new_repo(path, {"README": "big\n"})
    (work / "blob.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    head = client.commit(work, {}, "big")
    return work, head


def raw_receive_pack(client: Client, app: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*client.ssh_base, "-T", "git@127.0.0.1", f"git-receive-pack '{app}.git'"],
        env=client.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_pid_exit(pid: int) -> None:
    """Block until a process that is not our child exits (pidfd: an event, no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        assert ready, f"process {pid} did not exit"
    finally:
        os.close(fd)


def test_client_killed_mid_push(owner, app, server, tmp_path):
    repo = server.repo(app)
    before_refs, before_objects = server_refs(repo), object_count(repo)
    work, head = big_commit(owner, tmp_path / "work")
    pack = pack_of(owner, work, all_objects(owner, work))
    proc = raw_receive_pack(owner, app)
    proc.stdin.write(pkt(f"{ZERO} {head} refs/heads/main\0report-status\n") + b"0000")
    proc.stdin.write(pack[: len(pack) // 2])
    proc.stdin.flush()
    proc.kill()  # the client dies with half of the pack sent
    proc.wait(TIMEOUT)
    server.wait_until(lambda: not server.gateway.sessions)  # receive-pack has ended
    assert server_refs(repo) == before_refs
    assert object_count(repo) == before_objects
    no_quarantine_left(repo)
    strict_fsck(repo)
    registry_consistent(server.config.storage.database)


def test_gateway_sigkilled_mid_push_then_restarted(tmp_path):
    config = write_config(tmp_path / "state")
    admin = Admin(config)
    gateway = ServeProcess(config)
    key = keygen(tmp_path / "id")
    admin.ok("user", "add", "kim")
    admin.ok("key", "add", "kim", "k", f"{key}.pub")
    admin.ok("app", "create", "web", "--owner", "kim")
    repo = tmp_path / "state" / "repos" / "web.git"
    client = Client(tmp_path / "home", key, gateway, name="kim")
    work, head = big_commit(client, tmp_path / "work")
    pack = pack_of(client, work, all_objects(client, work))
    proc = raw_receive_pack(client, "web")
    proc.stdin.write(pkt(f"{ZERO} {head} refs/heads/main\0report-status\n") + b"0000")
    proc.stdin.write(pack[: len(pack) // 2])
    proc.stdin.flush()
    receive_pack = int(
        gateway.wait_for(r"event=process_started pid=(\d+) service=receive-pack").group(1)
    )
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.finish()
    wait_pid_exit(receive_pack)  # orphaned, it sees EOF, cleans its quarantine and exits
    proc.kill()
    proc.wait(TIMEOUT)
    assert server_refs(repo) == {}
    # receive-pack, orphaned, may die of SIGPIPE while its unpack-objects child still writes:
    # objects can then stay in a quarantine directory, never in the repository.
    assert object_count(repo) == 0
    strict_fsck(repo)
    registry_consistent(tmp_path / "state" / "gw.db")
    # Restarted, the gateway serves the same push normally.
    again = ServeProcess(config)
    client = Client(tmp_path / "home2", key, again, name="kim")
    client.git("push", "-q", client.url("web"), "main", cwd=work)
    assert server_refs(repo) == {"refs/heads/main": head}
    strict_fsck(repo)
    assert again.stop() == 0


@pytest.mark.parametrize(("clients", "rounds"), [(2, 3), (10, 2)])
def test_concurrent_pushes_to_one_branch(
    owner, app, server, admin, make_user, tmp_path, clients, rounds
):
    repo = server.repo(app)
    base = owner.new_repo(tmp_path / "base")
    owner.git("push", "-q", owner.url(app), "main", cwd=base)
    pushers = []
    for index in range(clients):
        member = make_user(f"racer{index}-")
        admin.ok("app", "grant", app, member.name, "write")
        copy = tmp_path / f"copy{index}"
        member.git("clone", "-q", member.url(app), str(copy))
        pushers.append((member, copy))
    for round_number in range(rounds):
        winner = race_one_round(pushers, app, round_number)
        assert server_refs(repo)["refs/heads/main"] == winner  # no lost update
        strict_fsck(repo)
    registry_consistent(server.config.storage.database)


def test_pack_referencing_a_missing_object_is_rejected(owner, app, server, tmp_path):
    repo = server.repo(app)
    work = owner.new_repo(tmp_path / "work", {"README": "hello\n", "data": "payload\n"})
    head = owner.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    tree = owner.git("rev-parse", "HEAD^{tree}", cwd=work).stdout.strip()
    pack = pack_of(owner, work, [head, tree])  # the blobs are left out
    proc = raw_receive_pack(owner, app)
    out, _ = proc.communicate(
        pkt(f"{ZERO} {head} refs/heads/main\0report-status\n") + b"0000" + pack, timeout=TIMEOUT
    )
    assert b"ng refs/heads/main" in out
    assert server_refs(repo) == {}
    assert run(["git", "cat-file", "-e", head], cwd=repo).returncode != 0
    no_quarantine_left(repo)
    strict_fsck(repo)


@pytest.fixture
def small_disk(tmp_path):
    """A gateway whose repositories live on a 4 MiB tmpfs (needs permission to mount)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    config = write_config(tmp_path / "state", storage={"repos": str(mount_point / "repos")})
    server = ServerThread(config).start()
    admin = Admin(config)
    name, app = unique("disk"), unique("diskapp")
    key = keygen(tmp_path / "disk_id")
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "k", f"{key}.pub")
    admin.ok("app", "create", app, "--owner", name)
    client = Client(tmp_path / "diskhome", key, server, name=name)
    try:
        yield server, client, app, mount_point
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(mount_point)], timeout=TIMEOUT, check=False)


def test_disk_full_during_push(small_disk, tmp_path):
    server, client, app, _ = small_disk
    repo = server.repo(app)
    work, _ = big_commit(client, tmp_path / "work")  # 8 MiB into a 4 MiB disk
    result = client.git("push", client.url(app), "main", cwd=work, check=False)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr or "unpack" in result.stderr
    assert server_refs(repo) == {}
    no_quarantine_left(repo)
    strict_fsck(repo)
    # The space was given back: a small push goes through.
    small = client.new_repo(tmp_path / "small")
    client.git("push", "-q", client.url(app), "main", cwd=small)
    strict_fsck(repo)
    registry_consistent(server.config.storage.database)


def test_read_only_repository(small_disk, tmp_path):
    server, client, app, mount_point = small_disk
    repo = server.repo(app)
    remount = subprocess.run(
        ["mount", "-o", "remount,ro", str(mount_point)],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    if remount.returncode != 0:
        pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")
    try:
        work = client.new_repo(tmp_path / "work")
        result = client.git("push", client.url(app), "main", cwd=work, check=False)
        assert result.returncode != 0
        assert "Read-only file system" in result.stderr or "unable to create" in result.stderr
        assert client.git("ls-remote", client.url(app)).returncode == 0  # reads still work
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount_point)], timeout=TIMEOUT, check=True)
    assert server_refs(repo) == {}
    no_quarantine_left(repo)
    strict_fsck(repo)
