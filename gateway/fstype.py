"""Which filesystem holds a path, and whether it is a network one (where one node's cache may
hide what another wrote: see docs/cluster.md)."""

from __future__ import annotations

import os
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

# Filesystems whose other clients can change what this machine caches. FUSE filesystems are
# named "fuse.<program>" (sshfs, s3fs, rclone, glusterfs, ceph...): every one of those counts,
# since a FUSE program's caching is its own, as sshfs's 20 s default shows ("fuseblk", ntfs-3g
# or exfat on a local disk, is not one of those).
NETWORK = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "9p",
        "afs",
        "lustre",
        "gpfs",
        "ocfs2",
        "gfs2",
        "beegfs",
        "orangefs",
        "virtiofs",
    }
)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_of(path: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem `path` (resolved) lives on, as the kernel names it
    ("ext4", "nfs4", "fuse.sshfs"); "" if it cannot be told."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = _unescape(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # The last of equal mount points is the one on top.
        if inside and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def is_network(kind: str) -> bool:
    return kind in NETWORK or kind.startswith("fuse.")
