"""The deploy program check: what the pusher is told, and that a hostile tree shows nothing
of what lies outside the export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.deploys import program
from gateway.deploys.program import MISSING, NOT_A_FILE, NOT_EXECUTABLE, explain, problem

SHA = "abc12345" + "0" * 32


@pytest.fixture
def export(tmp_path: Path) -> Path:
    tree = tmp_path / "export"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "deploy").write_text("#!/bin/sh\n")
    (tree / "bin" / "deploy").chmod(0o755)
    (tree / "notes.txt").write_text("x")
    return tree


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("./bin/deploy", None),
        ("bin/deploy", None),
        ("bin//./deploy", None),
        ("./deploy", MISSING),
        ("./bin/missing", MISSING),
        ("./notes.txt/deploy", MISSING),
        ("./notes.txt", NOT_EXECUTABLE),
        ("./bin", NOT_A_FILE),
        # Not from the tree: left to PATH or to the host inside the sandbox.
        ("deploy", None),
        ("/usr/bin/true", None),
        ("/nonexistent/deploy", None),
    ],
)
def test_programs_of_the_tree(export, name, expected):
    assert problem(export, name) == expected


def test_links_inside_the_tree_are_followed(export):
    (export / "deploy").symlink_to("bin/deploy")
    (export / "up").symlink_to("bin/../notes.txt")
    (export / "bin" / "back").symlink_to("../bin/deploy")
    (export / "dangling").symlink_to("bin/nothing")
    (export / "loop").symlink_to("loop")
    assert problem(export, "./deploy") is None
    assert problem(export, "./bin/back") is None
    assert problem(export, "./up") == NOT_EXECUTABLE
    assert problem(export, "./dangling") == MISSING
    assert problem(export, "./loop") is None  # too many links: not judged here


@pytest.mark.parametrize("target", ["/etc/shadow", "../../x", "../outside", "/"])
def test_regression_links_out_of_the_tree_are_not_judged(export, target, tmp_path):
    """A tree's link out of the export gets the same answer whether what it names exists,
    is executable, or not: the gateway neither stats it nor tells anything about it."""
    (tmp_path / "outside").write_text("#!/bin/sh\n")
    (export / "deploy").symlink_to(target)
    (export / "bin" / "deep").symlink_to(f"../{target}" if not target.startswith("/") else target)
    assert problem(export, "./deploy") is None
    assert problem(export, "./bin/deep") is None
    assert problem(export, "../outside") is None
    assert problem(export, "./bin/../../outside") is None


def test_regression_the_walk_opens_names_relative_to_the_export_only(export, monkeypatch):
    """Every lookup is one name under a directory descriptor, with O_NOFOLLOW: the kernel is
    never asked to resolve a path the tree chose."""
    (export / "deploy").symlink_to("/etc/shadow")
    (export / "escape").symlink_to("../../../etc/passwd")
    (export / "bin" / "link").symlink_to("deploy")
    opened: list[tuple[str, int | None, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *, dir_fd=None):
        opened.append((str(path), dir_fd, flags))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def no_path_lookup(*args, **kwargs):
        raise AssertionError(f"path lookup {args}")

    monkeypatch.setattr(program.os, "open", spy)
    monkeypatch.setattr(program.os, "stat", no_path_lookup)
    monkeypatch.setattr(program.os, "lstat", no_path_lookup)
    for name in ("./deploy", "./escape", "./bin/link", "./bin/deploy", "../x"):
        problem(export, name)
    assert opened[0][0] == str(export)
    for path, dir_fd, flags in opened:
        assert flags & os.O_NOFOLLOW
        if path != str(export):
            assert dir_fd is not None and "/" not in path and path not in ("", "..")
    assert not any(path in ("etc", "shadow", "passwd") for path, _, _ in opened)


def test_wordings():
    where = "in the pushed tree of branch 'main' (abc12345)"
    assert explain("./deploy", MISSING, "main", SHA, "[deploy] command") == (
        f"deploy command './deploy' not found {where}: add it, or change [deploy] command"
    )
    assert explain("./bin/deploy", NOT_EXECUTABLE, "main", SHA, "[deploy] command") == (
        f"deploy command './bin/deploy' is not executable {where}: "
        "run `git update-index --chmod=+x bin/deploy`, commit and push again"
    )
    assert explain("./bin", NOT_A_FILE, "main", SHA, "[apps.web] command") == (
        f"deploy command './bin' is not a regular file {where}: fix it, or change "
        "[apps.web] command"
    )


def deep_tree(root: Path, depth: int) -> str:
    """`depth` nested directories `d` under root, a non-executable `run` at the bottom; the
    relative path to it (a tree git archives and tar unpacks as long as it is < PATH_MAX)."""
    path = root.joinpath(*["d"] * depth)
    path.mkdir(parents=True)
    (path / "run").write_text("#!/bin/sh\n")
    return "/".join(["d"] * depth + ["run"])


def test_regression_a_deep_tree_does_not_hold_a_descriptor_per_level(export, monkeypatch):
    """The walk runs in the gateway's own process (root under the Quickstart): a pushed tree
    1100 directories deep, its `deploy` a link to the bottom, kept one descriptor open per
    level, so that every other connection, push and registry query of the process failed
    with EMFILE meanwhile (the soft limit a shell gives is 1024), and the check itself gave
    up. At most a bounded number of descriptors is open at once, whatever the depth."""
    (export / "deploy").symlink_to(deep_tree(export, 600))
    live, peak = set(), [0]
    real_open, real_close = os.open, os.close

    def spy_open(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        live.add(fd)
        peak[0] = max(peak[0], len(live))
        return fd

    def spy_close(fd):
        live.discard(fd)
        real_close(fd)

    monkeypatch.setattr(program.os, "open", spy_open)
    monkeypatch.setattr(program.os, "close", spy_close)
    assert problem(export, "./deploy") in (None, NOT_EXECUTABLE)
    assert not live
    assert peak[0] <= 70, peak[0]  # the export, the directory, up to MAX_DEPTH levels
    assert problem(export, "./bin/" + deep_tree(export / "bin", 3)) == NOT_EXECUTABLE
