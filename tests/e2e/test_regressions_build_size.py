"""[deploy] max_build_size: a deploy that writes past it, in any of the ways that hide disk
from a naive count (many files each under max_file_size, deleted files kept open or mapped,
blocks preallocated past the end, /tmp), is stopped while it runs with one clear line and
fails; one within it succeeds, with sparse files and hard links counted by what they take."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import DEPLOY_PYTHON, Admin, Client

BUILD = Path(__file__).with_name("build_size_deploy.py")
STOPPED = (
    "deploy stopped: the build wrote more than 5 MiB (export and /tmp) ([deploy] max_build_size)"
)
MODES = ("many", "unlinked", "mapped", "preallocated", "tmp", "small", "sparse", "hard-links")
APPS = (*MODES, "export")


def app_of(mode: str) -> str:
    return f"build-{mode}"


@pytest.fixture(scope="module")
def gw(module_gateways):
    return module_gateways(
        name="buildsize",
        deploy={
            "command": [DEPLOY_PYTHON, "build.py"],
            "timeout": 90,
            "max_build_size": "5M",
            "max_file_size": "1M",
        },
    )


@pytest.fixture(scope="module")
def builder(gw, tmp_path_factory) -> Client:
    home = tmp_path_factory.mktemp("builder")
    key = Admin(gw.config_path).enroll("builder", home, *(app_of(mode) for mode in APPS))
    return Client(home / "home", key, gw, name="builder")


def deploy(builder: Client, tmp_path: Path, mode: str, stay: bool) -> tuple[object, float]:
    files = {"build.py": BUILD.read_text(), "mode": f"{mode}\n"}
    if stay:
        files["stay"] = ""
    work = builder.new_repo(tmp_path / mode, files)
    started = time.monotonic()
    result = builder.git("push", builder.url(app_of(mode)), "main", cwd=work, check=False)
    return result, time.monotonic() - started


@pytest.mark.parametrize("mode", ["many", "unlinked", "mapped", "preallocated", "tmp"])
def test_regression_build_past_max_build_size_is_stopped(gw, builder, tmp_path, mode):
    result, elapsed = deploy(builder, tmp_path, mode, stay=True)
    assert result.returncode == 1, result.stderr
    assert f"wrote ({mode})" in result.stderr
    assert STOPPED in result.stderr
    assert "still running" not in result.stderr
    assert elapsed < 60, f"stopped after {elapsed:.1f} s"
    admin = Admin(gw.config_path)
    [record] = json.loads(admin.ok("deploy", "list", app_of(mode), "--json"))
    assert record["status"] == "failed"
    assert "max_build_size" in record["reason"]


@pytest.mark.parametrize("mode", ["small", "sparse", "hard-links"])
def test_build_within_max_build_size_succeeds(gw, builder, tmp_path, mode):
    result, _ = deploy(builder, tmp_path, mode, stay=False)
    assert result.returncode == 0, result.stderr
    assert f"wrote ({mode})" in result.stderr
    assert "deploy stopped" not in result.stderr


def test_regression_an_export_past_max_build_size_never_runs(gw, builder, tmp_path):
    """Within max_export_size (1 GiB) but not max_build_size: the command never starts."""
    files = {"build.py": BUILD.read_text(), "mode": "small\n"}
    files |= {f"asset-{i}.bin": os.urandom(512 * 1024).hex() for i in range(6)}  # 6 MiB
    work = builder.new_repo(tmp_path / "export", files)
    result = builder.git("push", builder.url(app_of("export")), "main", cwd=work, check=False)
    assert result.returncode == 1, result.stderr
    assert STOPPED in result.stderr
    assert "wrote (small)" not in result.stderr
