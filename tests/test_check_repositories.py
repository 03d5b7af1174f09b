"""`git-gateway check` on a repositories root on a network filesystem (issue 22), in-process
with a mountinfo file standing in for /proc/self/mountinfo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway import fstype
from tests.helpers import Admin, write_config
from tests.unit.test_fstype import mountinfo

INTERNAL = {"listen": "127.0.0.1:0", "peers": ["127.0.0.1/32"]}
OK = "repositories ok ({}: each repository served by its home node)"


@pytest.fixture
def mounted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Make the directory `where` (under tmp_path) a mount of `kind` for gateway.fstype."""

    def mount(kind: str, where: str = "repos") -> None:
        point = tmp_path / where
        point.mkdir(exist_ok=True)
        table = tmp_path / "mountinfo"
        table.write_text(mountinfo(("/", "ext4"), (os.path.realpath(point), kind)))
        monkeypatch.setattr(fstype, "MOUNTINFO", table)

    return mount


def check(tmp_path: Path, **cluster: object) -> tuple[list[str], list[str]]:
    """`check`'s warnings and its other lines; it exits 0 with warnings as it did before."""
    config = write_config(tmp_path, cluster={"node_timeout": 4, **cluster})
    code, out, err = Admin(config)("check")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[-1].startswith("registry ok")
    warnings = [line for line in lines if line.startswith("warning: ")]
    return warnings, [line for line in lines if line not in warnings]


def test_a_network_root_without_an_internal_listener_is_warned_about(tmp_path, mounted):
    mounted("fuse.sshfs")
    warnings, lines = check(tmp_path)
    [warning] = warnings
    assert warning.startswith(
        f"warning: [storage] repos ({tmp_path / 'repos'}) is on a network filesystem "
        "(fuse.sshfs) and [cluster] listen is not set: "
    )
    assert "set [cluster] listen and peers" in warning
    assert 'keep forward = "auto"' in warning and "docs/cluster.md" in warning
    assert not [line for line in lines if line.startswith("repositories")]


def test_forwarding_turned_off_is_warned_about(tmp_path, mounted):
    mounted("nfs4")
    [warning] = check(tmp_path, forward="never", **INTERNAL)[0]
    assert '(nfs4) and [cluster] forward = "never": ' in warning


@pytest.mark.parametrize(("kind", "forward"), [("fuse.sshfs", "auto"), ("ceph", "always")])
def test_a_network_root_with_forwarding_on_is_one_ok_line(tmp_path, mounted, kind, forward):
    mounted(kind)
    warnings, lines = check(tmp_path, forward=forward, **INTERNAL)
    assert warnings == []
    assert lines[0].startswith("config ok") and lines[1] == OK.format(kind)


def test_a_root_reached_through_a_symlink_is_judged_where_it_lies(tmp_path, mounted):
    mounted("fuse.sshfs", where="shared")
    (tmp_path / "repos").symlink_to(tmp_path / "shared")
    [warning] = check(tmp_path)[0]
    assert "(fuse.sshfs) and [cluster] listen is not set" in warning


@pytest.mark.parametrize("forward", ["auto", "never"])
def test_a_local_root_says_nothing_new(tmp_path, mounted, forward):
    mounted("ext4")
    warnings, lines = check(tmp_path, forward=forward)
    assert warnings == [] and not [line for line in lines if "repositor" in line]


def test_an_unreadable_mountinfo_says_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fstype, "MOUNTINFO", tmp_path / "missing")
    warnings, lines = check(tmp_path)
    assert warnings == [] and not [line for line in lines if "repositor" in line]
