"""A deploy's processes join its cgroup before any of its code runs: the sandbox starts behind
a gate that opens only once the gateway has moved it. Against a fake cgroup (this machine's
cgroups are v1): the move is a file written, the gate and the sandbox are real."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gateway import config
from gateway.deploys import cgroups, confine
from gateway.deploys.builddir import remove_tree
from gateway.deploys.buildsize import BuildWatch
from gateway.deploys.sandbox import Sandbox
from tests.helpers import run, write_config


def commanded(directory: Path) -> Path:
    return write_config(directory, deploy={"command": ["true"]})


class SlowCgroup(cgroups.Cgroup):
    """Records when it moved a process in, after taking its time about it."""

    moved_at: list[float]

    def add(self, pid: int) -> None:
        time.sleep(0.3)  # the sandbox must not start meanwhile
        (self.path / "cgroup.procs").write_text(f"{pid}\n")
        self.moved_at.append(time.time())


class BrokenCgroup(cgroups.Cgroup):
    def add(self, pid: int) -> None:
        raise cgroups.CgroupError(f"cannot move process {pid} into {self.path}: No space")


@pytest.fixture
def box(tmp_path):
    cfg = config.load(commanded(tmp_path))
    sandbox = Sandbox.of(cfg.deploy)
    assert cfg.deploy.build_dir is not None
    sandbox.prepare_build_dir(cfg.deploy.build_dir)
    export = Path(tempfile.mkdtemp(dir=cfg.deploy.build_dir))
    sandbox.prepare_dir(export)
    yield sandbox, export
    remove_tree(export)


async def spawn_confined(
    sandbox: Sandbox, export: Path, group: cgroups.Cgroup
) -> tuple[int, bytes]:
    watch = BuildWatch(export, 1 << 30, {})
    confinement = confine.Confinement(watch, group)
    proc = await sandbox.spawn(
        # The time it starts, then any directory it inherited (the gate's lock must not be
        # one: openat(fd, "..") would walk the host's tree).
        [
            "/bin/sh",
            "-c",
            "date +%s.%N; touch /app/ran; "
            'for f in /proc/$$/fd/*; do [ -d "$f" ] && echo "$f"; done; :',
        ],
        export_dir=export,
        env={},
        confinement=confinement,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.pid, out


def test_the_sandbox_runs_only_once_in_its_cgroup(box, tmp_path):
    sandbox, export = box
    group = SlowCgroup(tmp_path / "deploy-1")
    group.path.mkdir()
    group.moved_at = []
    pid, out = asyncio.run(spawn_confined(sandbox, export, group))
    assert (group.path / "cgroup.procs").read_text() == f"{pid}\n"
    [moved] = group.moved_at
    started, *directories = out.decode().splitlines()
    assert float(started) > moved  # the command's first act came after the move
    assert directories == []
    assert (export / "ran").exists()


def test_regression_a_failed_move_runs_nothing(box, tmp_path):
    sandbox, export = box
    group = BrokenCgroup(tmp_path / "deploy-2")
    with pytest.raises(OSError, match=r"cannot move process .* No space"):
        asyncio.run(spawn_confined(sandbox, export, group))
    assert not (export / "ran").exists()
    assert len(list(export.parent.glob(".gate-*"))) == 1  # removed by Confinement.close


def test_check_says_which_limits_this_host_enforces(tmp_path):
    result = run(
        [sys.executable, "-m", "gateway", "--config", str(commanded(tmp_path)), "check"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("deploy limits: ")]
    assert lines[0].startswith("deploy limits: max_build_size (4 GiB) enforced by a watcher")
    found = cgroups.detect()
    if isinstance(found, str):  # this machine: cgroup v1
        assert f"memory.max not enforced: cgroup v2 not delegated ({found})" in lines[2]
        assert "(memfd and shm are not counted by RLIMIT_DATA)" in lines[2]
        assert lines[3].startswith("deploy limits: pids.max not enforced")
    else:
        assert "enforced per deploy by cgroup v2" in lines[2]


def test_report_on_a_host_with_delegation(tmp_path, monkeypatch):
    cfg = config.load(commanded(tmp_path))
    monkeypatch.setattr(confine, "_delegation", cgroups.Delegation(Path("/sys/fs/cgroup/gw")))
    assert confine.report([cfg.deploy.max_build_size])[2] == (
        "deploy limits: memory.max (max_memory, for the whole deploy: shm, memfd and tmpfs "
        "included), memory.swap.max = 0 and pids.max (max_processes) enforced per deploy by "
        "cgroup v2 under /sys/fs/cgroup/gw"
    )
