"""gateway.fstype: the filesystem a path lives on, read from a mountinfo text."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import fstype


def mountinfo(*mounts: tuple[str, str]) -> str:
    """/proc/self/mountinfo lines for (mount point, type) pairs, in mount order; mount points
    escaped as the kernel writes them."""
    lines = []
    for number, (point, kind) in enumerate(mounts, start=20):
        escaped = point.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
        lines.append(f"{number} 1 0:{number} / {escaped} rw,relatime shared:1 - {kind} src rw")
    return "\n".join(lines) + "\n"


def test_the_longest_mount_point_holding_the_path_wins():
    text = mountinfo(("/", "ext4"), ("/srv", "xfs"), ("/srv/git", "fuse.sshfs"), ("/s", "nfs"))
    assert fstype.filesystem_of(Path("/srv/git/repos/web.git"), text) == "fuse.sshfs"
    assert fstype.filesystem_of(Path("/srv/git"), text) == "fuse.sshfs"
    assert fstype.filesystem_of(Path("/srv/gitlab"), text) == "xfs"  # a prefix, not a parent
    assert fstype.filesystem_of(Path("/srv"), text) == "xfs"
    assert fstype.filesystem_of(Path("/sr"), text) == "ext4"
    assert fstype.filesystem_of(Path("/"), text) == "ext4"


def test_escaped_spaces_tabs_and_backslashes_in_mount_points():
    text = mountinfo(("/", "ext4"), ("/mnt/shared repos", "nfs4"), ("/mnt/a\\b\tc", "ceph"))
    assert "\\040" in text and "\\134" in text and "\\011" in text
    assert fstype.filesystem_of(Path("/mnt/shared repos/web.git"), text) == "nfs4"
    assert fstype.filesystem_of(Path("/mnt/shared"), text) == "ext4"
    assert fstype.filesystem_of(Path("/mnt/a\\b\tc/x"), text) == "ceph"


def test_the_last_of_equal_mount_points_is_the_one_on_top():
    over = mountinfo(("/", "ext4"), ("/srv/repos", "ext4"), ("/srv/repos", "fuse.sshfs"))
    assert fstype.filesystem_of(Path("/srv/repos/web.git"), over) == "fuse.sshfs"
    under = mountinfo(("/", "ext4"), ("/srv/repos", "fuse.sshfs"), ("/srv/repos", "tmpfs"))
    assert fstype.filesystem_of(Path("/srv/repos/web.git"), under) == "tmpfs"


def test_the_path_is_resolved_through_symlinks(tmp_path):
    """A link on a local disk to a directory on a network mount is on the network mount (and
    the other way round): git reads through the link."""
    (tmp_path / "mnt").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "repos").symlink_to(tmp_path / "mnt")
    (tmp_path / "mnt" / "back").symlink_to(tmp_path / "local")
    text = mountinfo(("/", "ext4"), (str(tmp_path / "mnt"), "fuse.sshfs"))
    assert fstype.filesystem_of(tmp_path / "local" / "repos", text) == "fuse.sshfs"
    assert fstype.filesystem_of(tmp_path / "local" / "repos" / "web.git", text) == "fuse.sshfs"
    assert fstype.filesystem_of(tmp_path / "mnt" / "back", text) == "ext4"


def test_relative_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = mountinfo(("/", "ext4"), (str(tmp_path), "nfs"))
    assert fstype.filesystem_of(Path("repos"), text) == "nfs"


def test_malformed_lines_are_skipped():
    text = "garbage\n1 2 3 4 /srv rw\n5 6 7 8 /srv rw - \n" + mountinfo(("/", "xfs"))
    assert fstype.filesystem_of(Path("/srv/repos"), text) == "xfs"
    assert fstype.filesystem_of(Path("/srv/repos"), "") == ""


def test_this_machines_own_mountinfo_is_read_by_default():
    assert fstype.filesystem_of(Path("/")) != ""
    assert fstype.filesystem_of(Path("/proc/self")) == "proc"


def test_an_unreadable_mountinfo_tells_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fstype, "MOUNTINFO", tmp_path / "missing")
    assert fstype.filesystem_of(Path("/")) == ""
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr(fstype, "MOUNTINFO", tmp_path / "dir")
    assert fstype.filesystem_of(Path("/")) == ""
    assert not fstype.is_network("")


@pytest.mark.parametrize(
    "kind", ["fuse.sshfs", "fuse.rclone", "fuse.s3fs", "nfs", "nfs4", "ceph", "cifs"]
)
def test_network_filesystems(kind):
    assert fstype.is_network(kind)


@pytest.mark.parametrize(
    "kind", ["ext4", "xfs", "tmpfs", "btrfs", "overlay", "zfs", "fuseext", "fuseblk"]
)
def test_local_filesystems(kind):
    assert not fstype.is_network(kind)
