"""The way to `[deploy] build_dir` for the sandbox user (bwrap mounts by path as that user):
the gateway opens its own directories for search, never for reading, and names any other."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from gateway import config
from gateway.deploys import sandbox as sandbox_module
from gateway.deploys.network import Network
from gateway.deploys.sandbox import Limits, RunAs, Sandbox, SandboxError
from tests.helpers import sandbox_root, unique

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a sandbox user exists under root")

NOBODY = RunAs(65534, 65534, "nobody")


def box(run_as: RunAs | None = NOBODY) -> Sandbox:
    limits = Limits(1, 1, 1, 1, 1, 1)
    return Sandbox("bubblewrap", (), (), Network("none"), run_as, limits, "bwrap", "prlimit")


@pytest.fixture
def base() -> Path:
    """A directory whose parents everyone can search (pytest's own are private)."""
    path = sandbox_root() / unique("bd")
    path.mkdir(mode=0o711)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_regression_the_private_var_of_a_first_start_is_made_searchable(base: Path) -> None:
    """The Quickstart as root failed: the first start made var/ 0700 (for the registry), so
    `nobody` could not reach var/builds."""
    var = base / "var"
    var.mkdir(mode=0o700)
    (var / "gateway.db").write_text("")
    (var / "gateway.db").chmod(0o600)
    changed = box().prepare_build_dir(var / "builds")
    assert changed == [var]
    assert mode(var) == 0o701  # search only: nobody cannot list var/
    assert mode(var / "gateway.db") == 0o600
    assert (var / "builds").is_dir()
    assert box().prepare_build_dir(var / "builds") == []  # once is enough


def test_created_directories_get_search_for_the_sandbox_user_only(base: Path) -> None:
    build = base / "a" / "b" / "builds"
    old = os.umask(0o077)  # what the gateway runs under (gateway.umask)
    try:
        changed = box().prepare_build_dir(build)
    finally:
        os.umask(old)
    assert changed == [build, build.parent, build.parent.parent]
    assert all(mode(d) == 0o701 for d in changed)


def test_a_gateway_not_root_changes_nothing(base: Path) -> None:
    private = base / "private"
    private.mkdir(mode=0o700)
    assert box(run_as=None).prepare_build_dir(private / "builds") == []
    assert mode(private) == 0o700


def test_regression_a_directory_of_someone_else_on_the_way_is_refused(base: Path) -> None:
    """Its owner could swap the build directory for a link between a deploy's checks and
    its use: refused, named, unchanged."""
    foreign = base / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 4242, 4242)
    with pytest.raises(SandboxError) as raised:
        box().prepare_build_dir(foreign / "builds")
    assert f"lies in {foreign}, which another user can change" in str(raised.value)
    assert mode(foreign) == 0o700


@pytest.mark.parametrize("run_as", [NOBODY, None])
def test_regression_a_build_dir_planted_by_another_user_is_refused(
    base: Path, run_as: RunAs | None
) -> None:
    """The default build directory has a predictable name in /var/tmp, where anyone may
    create names first: a link, a directory of theirs or one they can write is refused."""
    target = base / "elsewhere"
    target.mkdir()
    planted = [base / "link", base / "theirs", base / "open"]
    planted[0].symlink_to(target)
    planted[1].mkdir(mode=0o755)
    os.chown(planted[1], 4242, 4242)
    planted[2].mkdir()
    planted[2].chmod(0o777)
    for path in planted:
        with pytest.raises(SandboxError, match=r"must be a directory \(not a link\)"):
            box(run_as).prepare_build_dir(path)
    assert mode(planted[2]) == 0o777 and planted[0].is_symlink()


def test_a_sticky_shared_directory_above_is_fine_a_plain_shared_one_is_not(base: Path) -> None:
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    box().prepare_build_dir(sticky / "builds")
    shared = base / "shared-plain"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SandboxError, match=f"lies in {shared}, which another user can change"):
        box().prepare_build_dir(shared / "builds")


def test_the_default_build_dir_is_per_gateway_and_stable(tmp_path: Path) -> None:
    first = config.from_mapping({"storage": {"control_socket": str(tmp_path / "a.sock")}})
    again = config.from_mapping({"storage": {"control_socket": str(tmp_path / "a.sock")}})
    other = config.from_mapping({"storage": {"control_socket": str(tmp_path / "b.sock")}})
    assert first.deploy.build_dir == again.deploy.build_dir != other.deploy.build_dir
    assert first.deploy.build_dir is not None
    assert first.deploy.build_dir.parent == Path("/var/lib/git-gateway-builds")
    explicit = config.from_mapping({"deploy": {"build_dir": str(tmp_path / "b")}})
    assert explicit.deploy.build_dir == tmp_path / "b"


def test_a_gateway_not_root_builds_beside_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cfg = config.from_mapping({})
    assert cfg.deploy.build_dir == Path("var/builds").absolute()


def test_regression_a_home_directory_is_never_opened(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = base / "home"
    home.mkdir(mode=0o700)
    entry = pwd.struct_passwd(("alice", "x", 1000, 1000, "", str(home), "/bin/sh"))
    monkeypatch.setattr(sandbox_module.pwd, "getpwall", lambda: [entry])
    with pytest.raises(SandboxError, match=f"{home} is not searchable"):
        box().prepare_build_dir(home / "gateway" / "builds")
    assert mode(home) == 0o700


def test_a_directory_of_the_sandbox_group_needs_group_search(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir(mode=0o700)
    os.chown(shared, 0, NOBODY.gid)
    assert box().prepare_build_dir(shared / "builds") == [shared]
    assert mode(shared) == 0o710


def test_regression_no_local_user_can_take_the_default_build_dir_first(tmp_path: Path) -> None:
    """Found in review: the default was once /var/tmp/git-gateway-UID-builds-DIGEST, a name
    easy to know, in a directory where anyone may create names: a directory of someone
    else's there was rightly refused, which stopped the gateway at start. A root gateway's
    default now lies in a directory only root can create names in."""
    cfg = config.from_mapping({"storage": {"control_socket": str(tmp_path / "gw.sock")}})
    assert cfg.deploy.build_dir is not None
    for directory in cfg.deploy.build_dir.parents:
        if directory.exists():
            info = directory.stat()
            assert info.st_uid == 0 and not info.st_mode & 0o022, directory
