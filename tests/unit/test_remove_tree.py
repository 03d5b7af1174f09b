"""Removing a deploy's export directory, whatever the pushed tree or the build left in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.deploys.builddir import remove_tree
from tests.helpers import sandbox_root, unique

TIMEOUT = 60


def nest(root: Path, depth: int) -> None:
    """`depth` directories `d` inside each other under root, made one level at a time (as a
    build can, or tar within PATH_MAX), with a file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


@pytest.fixture
def export(tmp_path: Path):
    path = tmp_path / "deploy-1-x"
    path.mkdir()
    yield path
    # Whatever remove_tree left (the regression below): rm copes with any depth.
    subprocess.run(["rm", "-rf", "--", str(path)], timeout=TIMEOUT, check=False)


def test_regression_a_tree_nested_deeper_than_python_recursion_is_removed(export):
    """A tenant pushed a tree 1100 directories deep (git archive and tar take it): shutil's
    rmtree recursed once per level, raised RecursionError, the deploy ended in `deploy
    error`, and the export stayed in build_dir for good (nothing removes it later). Each
    such push left up to [deploy] max_export_size on the gateway's disk: a small, well
    compressed push filled the disk every tenant's deploys and the host share."""
    nest(export, 1100)
    remove_tree(export)
    assert not os.path.lexists(export)


def test_what_a_build_did_to_permissions_and_links_does_not_stop_or_mislead_it(export, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("the host's")
    (export / "link").symlink_to(outside)
    (export / "file-link").symlink_to(outside / "keep")
    locked = export / "a" / "locked"
    locked.mkdir(parents=True)
    (locked / "f").write_text("x")
    locked.chmod(0o000)
    (export / "a").chmod(0o500)
    remove_tree(export)
    assert not os.path.lexists(export)
    assert (outside / "keep").read_text() == "the host's"


def test_a_link_in_place_of_the_directory_is_removed_not_followed(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    link = tmp_path / "deploy-2-x"
    link.symlink_to(target)
    remove_tree(link)
    assert not os.path.lexists(link) and (target / "keep").exists()


def test_a_missing_directory_is_fine(tmp_path):
    remove_tree(tmp_path / "never-made")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs another user to be the gateway's")
def test_a_gateway_not_root_opens_up_what_its_build_locked(tmp_path):
    """Not root, the gateway cannot list or empty a directory its build made 000 or 0500
    (the files are its own, through the sandbox's user namespace): it opens them up first."""
    base = sandbox_root() / unique("rt")
    base.mkdir(mode=0o711)
    os.chown(base, 65534, 65534)  # the build directory: the gateway's own
    export = base / "deploy-3-x"
    (export / "ro" / "locked").mkdir(parents=True)
    (export / "ro" / "locked" / "f").write_text("x")
    nest(export, 30)
    for path in [export, *export.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    (export / "ro" / "locked").chmod(0o000)
    (export / "ro").chmod(0o500)
    code = (
        "import sys; from pathlib import Path; from gateway.deploys.builddir import remove_tree;"
        "remove_tree(Path(sys.argv[1]))"
    )
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    subprocess.run(
        [*argv, sys.executable, "-c", code, str(export)],
        cwd=Path(__file__).parents[2],
        timeout=TIMEOUT,
        check=True,
    )
    assert not os.path.lexists(export)
