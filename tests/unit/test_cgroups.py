"""Per-deploy cgroups against a fake cgroup2 tree: a temporary directory stands in for
/sys/fs/cgroup, and a fake `mkdir` fills a new cgroup with its files as the kernel does."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.deploys import cgroups

KERNEL_FILES = {
    "cgroup.procs": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.controllers": "memory pids\n",
    "cgroup.subtree_control": "",
    "cgroup.kill": "",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.oom.group": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    "pids.max": "max\n",
    "pids.events": "max 0\n",
}
SERVICE = "system.slice/git-gateway.service"


def populate(path: Path, skip: tuple[str, ...] = ()) -> None:
    for name, text in KERNEL_FILES.items():
        if name not in skip:
            (path / name).write_text(text)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A delegated cgroup2 tree: the gateway's service cgroup holds its two processes."""
    root = tmp_path / "cgroup"
    base = root / SERVICE
    base.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    populate(base)
    (base / "cgroup.procs").write_text("100\n200\n")
    proc_self = tmp_path / "self-cgroup"
    proc_self.write_text(f"0::/{SERVICE}\n")
    moves: list[tuple[str, str]] = []

    def kernel_mkdir(path: Path) -> None:
        path.mkdir()
        populate(path)

    def kernel_write(path: Path, text: str) -> None:
        if not path.exists():
            raise PermissionError(errno.EACCES, "Permission denied")
        moves.append((str(path.relative_to(root)), text))
        if path.name == "cgroup.procs":
            with path.open("a") as out:  # the kernel lists every process moved in
                out.write(f"{text}\n")
        elif path.name == "cgroup.subtree_control":  # read back as "memory pids"
            path.write_text(" ".join(word.lstrip("+") for word in text.split()) + "\n")
        else:
            path.write_text(text)

    monkeypatch.setattr(cgroups, "_mkdir", kernel_mkdir)
    monkeypatch.setattr(cgroups, "_rmdir", shutil.rmtree)
    monkeypatch.setattr(cgroups, "_write", kernel_write)
    return root, base, proc_self, moves


def test_detects_a_delegated_subtree(tree):
    root, base, proc_self, _ = tree
    assert cgroups.detect(root, proc_self) == cgroups.Delegation(base)


def test_a_gateway_already_in_its_leaf_manages_the_parent(tree):
    root, base, proc_self, _ = tree
    (base / "gateway").mkdir()
    proc_self.write_text(f"0::/{SERVICE}/gateway\n")
    assert cgroups.detect(root, proc_self) == cgroups.Delegation(base)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("v1", "no cgroup v2 hierarchy: a cgroup v1 host"),
        ("hybrid", "is not a cgroup2 filesystem: a cgroup v1 or hybrid host"),
        ("no-memory", "lacks the memory controller"),
        ("no-delegation", "is not delegated to it: cgroup.subtree_control is not writable"),
        ("host-root", "the gateway runs in the root cgroup of"),
    ],
)
def test_degrades_with_the_reason(tree, monkeypatch, change, reason):
    root, base, proc_self, _ = tree
    if change == "v1":  # this machine's kind: v1 lines only
        proc_self.write_text("4:memory:/user.slice\n1:name=systemd:/user.slice\n")
    elif change == "hybrid":  # a 0:: line, but /sys/fs/cgroup is v1's tmpfs
        (root / "cgroup.controllers").unlink()
    elif change == "host-root":  # never moves every process of the host into a leaf
        proc_self.write_text("0::/\n")
        (root / "cgroup.subtree_control").write_text("memory pids\n")
        (root / "cgroup.procs").write_text("1\n2\n")
    elif change == "no-memory":
        (base / "cgroup.controllers").write_text("cpu pids\n")
    else:  # root may write anything: the test asks os.access as an unprivileged user would
        real = cgroups.os.access
        monkeypatch.setattr(
            cgroups.os,
            "access",
            lambda path, mode: False if str(path).endswith("subtree_control") else real(path, mode),
        )
    found = cgroups.detect(root, proc_self)
    assert isinstance(found, str) and reason in found


def test_a_container_s_own_cgroup_namespace_root_is_delegated(tree):
    """With a cgroup namespace, "/" is the container's own cgroup (it has memory.max)."""
    root, _, proc_self, _ = tree
    populate(root)
    proc_self.write_text("0::/\n")
    assert cgroups.detect(root, proc_self) == cgroups.Delegation(root)


def test_prepare_moves_the_gateway_into_a_leaf_then_enables_the_controllers(tree):
    _, base, _, moves = tree
    delegation = cgroups.Delegation(base)
    delegation.prepare()
    leaf = f"{SERVICE}/gateway/cgroup.procs"
    assert moves == [
        (leaf, "100"),
        (leaf, "200"),
        (f"{SERVICE}/cgroup.subtree_control", "+memory +pids"),
    ]
    delegation.prepare()  # idempotent: nothing moves again
    assert len(moves) == 3


def test_create_sets_the_limits_and_remove_kills_and_removes(tree):
    _, base, _, moves = tree
    group = cgroups.Delegation(base).create(7, 256 * 1024 * 1024, 64)
    assert group.path.parent == base and group.path.name.startswith("deploy-7-")
    assert (group.path / "memory.max").read_text() == str(256 * 1024 * 1024)
    assert (group.path / "memory.swap.max").read_text() == "0"
    assert (group.path / "pids.max").read_text() == "64"
    assert (group.path / "memory.oom.group").read_text() == "1"
    group.add(4242)
    assert (group.path / "cgroup.procs").read_text() == "4242\n"
    assert group.remove()
    assert (str((group.path / "cgroup.kill").relative_to(base.parent.parent)), "1") in moves
    assert not group.path.exists()


def test_optional_files_are_skipped_where_the_kernel_has_none(tree, monkeypatch):
    _, base, _, _ = tree
    monkeypatch.setattr(
        cgroups, "_mkdir", lambda p: (p.mkdir(), populate(p, ("memory.swap.max", "cgroup.kill")))
    )
    group = cgroups.Delegation(base).create(1, 1 << 30, 10)
    assert not (group.path / "memory.swap.max").exists()
    assert group.remove()


def test_a_cgroup_without_the_memory_controller_is_refused_and_removed(tree, monkeypatch):
    _, base, _, _ = tree
    monkeypatch.setattr(cgroups, "_mkdir", lambda p: (p.mkdir(), populate(p, ("memory.max",))))
    with pytest.raises(cgroups.CgroupError, match=r"cannot set the limits of .*deploy-3-"):
        cgroups.Delegation(base).create(3, 1 << 30, 10)
    assert [p.name for p in base.iterdir() if p.name.startswith("deploy-")] == []


def test_events_explain_an_out_of_memory_kill(tree):
    _, base, _, _ = tree
    group = cgroups.Delegation(base).create(1, 1 << 30, 10)
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n")
    (group.path / "pids.events").write_text("max 3\n")
    assert group.events() == {"memory.oom_kill": 1, "pids.max": 3}


def test_remove_waits_for_the_processes_to_go(tree, monkeypatch):
    _, base, _, _ = tree
    group = cgroups.Delegation(base).create(1, 1 << 30, 10)
    busy = [OSError(errno.EBUSY, "busy")] * 3

    def rmdir(path: Path) -> None:
        if busy:
            raise busy.pop()
        shutil.rmtree(path)

    monkeypatch.setattr(cgroups, "_rmdir", rmdir)
    assert group.remove() and not busy


def test_kill_without_cgroup_kill_signals_every_process(tree):
    _, base, _, _ = tree
    group = cgroups.Cgroup(base / "old-kernel")
    group.path.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (group.path / "cgroup.procs").write_text(f"{child.pid}\n")
        group.kill()
        assert child.wait(timeout=10) == -9
    finally:
        child.kill()
        child.wait(timeout=10)
