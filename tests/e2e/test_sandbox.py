"""The deploy sandbox at start: built once per configured command pipeline, or the gateway
refuses to start with one line saying why and what to do; `sandbox = "none"` is loud."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import DEPLOY_PYTHON, PIPELINE, ServeProcess, exchange_subdir, run, write_config


def gateway(config: Path, *args: str, path: str | None = None):  # type: ignore[no-untyped-def]
    env = {"PATH": path or os.environ["PATH"], "HOME": str(config.parent)}
    return run([sys.executable, "-m", "gateway", "--config", str(config), *args], env=env)


def tools_without_bwrap(tmp_path: Path) -> str:
    """A PATH with git and prlimit but no bwrap: a host where bubblewrap is not installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "prlimit"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def commanded(tmp_path: Path, **deploy: object) -> Path:
    return write_config(
        tmp_path / "state", deploy={"command": [DEPLOY_PYTHON, str(PIPELINE)], **deploy}
    )


@pytest.mark.parametrize("verb", ["check", "serve"])
def test_regression_no_bwrap_no_start(tmp_path, verb):
    result = gateway(commanded(tmp_path), verb, path=tools_without_bwrap(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: [deploy]: deploy sandbox: bwrap not found")
    assert "apt-get install bubblewrap" in lines[-1] and 'sandbox = "none"' in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "gw.sock").exists()  # nothing started


def test_no_pipeline_needs_no_sandbox(tmp_path):
    config = write_config(tmp_path / "state")
    result = gateway(config, "check", path=tools_without_bwrap(tmp_path))
    assert result.returncode == 0, result.stderr


def test_check_builds_a_sandbox_per_pipeline(tmp_path):
    config = commanded(tmp_path)
    config.write_text(config.read_text() + "[apps.other]\nnetwork = false\n")
    result = gateway(config, "check")
    assert result.returncode == 0, result.stderr
    assert "deploy sandbox ok for [deploy], [apps.other]" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox user applies to a root gateway")
def test_regression_root_gateway_needs_an_unprivileged_sandbox_user(tmp_path):
    config = commanded(tmp_path, sandbox_user="")
    result = gateway(config, "check")
    assert result.returncode == 2
    assert "the gateway runs as root: set [deploy] sandbox_user" in result.stderr
    config = commanded(tmp_path, sandbox_user="root")
    assert "must not be root" in gateway(config, "check").stderr
    config = commanded(tmp_path, sandbox_user="no-such-user-here")
    assert "no such user 'no-such-user-here'" in gateway(config, "check").stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a sandbox user other than the gateway's")
def test_unreachable_extra_path_is_explained(tmp_path):
    private = tmp_path / "private"  # pytest's directories are 0700: nobody cannot walk in
    (private / "toolchain").mkdir(parents=True)
    config = commanded(tmp_path, sandbox_read_paths=[str(private / "toolchain")])
    result = gateway(config, "check")
    assert result.returncode == 2
    assert "must be able to reach" in result.stderr and "Permission denied" in result.stderr


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["relative/dir"], "is not an absolute path"),
        (["/proc/1"], "part of the sandbox's own layout"),
        (["/"], "part of the sandbox's own layout"),
        (["/tmp"], "part of the sandbox's own layout"),
    ],
)
def test_regression_extra_paths_cannot_replace_the_sandbox(tmp_path, paths, message):
    result = gateway(commanded(tmp_path, sandbox_read_paths=paths), "check")
    assert result.returncode == 2 and message in result.stderr


def test_regression_extra_paths_cannot_expose_the_gateway_state(tmp_path):
    state = tmp_path / "state"
    for key, path in (
        ("sandbox_read_paths", state),  # the directory holding registry, keys, repos...
        ("sandbox_read_paths", state / "repos"),
        ("sandbox_write_paths", state / "repos" / "victim.git"),
        ("sandbox_read_paths", state / "gw.db"),
    ):
        result = gateway(commanded(tmp_path, **{key: [str(path)]}), "check")
        assert result.returncode == 2, (key, path)
        assert f"[deploy] {key}: {path} would expose" in result.stderr


def test_sandbox_none_warns_at_every_start(tmp_path):
    config = commanded(tmp_path, sandbox="none")
    result = gateway(config, "check")
    assert result.returncode == 0
    assert 'warning: [deploy] sandbox = "none": deploy commands run as the gateway' in result.stdout
    server = ServeProcess(config)
    try:
        line = next(line for line in server.lines if "event=sandbox_warning" in line)
        assert "single-tenant installations only" in line
    finally:
        assert server.stop() == 0


def test_shared_writable_paths_are_warned_about(tmp_path):
    cache = exchange_subdir("cache")  # somewhere the sandbox user can reach
    result = gateway(commanded(tmp_path, sandbox_write_paths=[str(cache)]), "check")
    assert result.returncode == 0, result.stderr
    assert "warning: [deploy] sandbox_write_paths" in result.stdout
    assert "another's build reads" in result.stdout
