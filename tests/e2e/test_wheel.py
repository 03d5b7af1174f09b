"""The release artifacts: `python -m build` makes a wheel and an sdist, and the wheel alone,
installed with the locked dependencies in a clean venv outside the source tree, serves a push
and a clone (its hooks included)."""

from __future__ import annotations

import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import gateway
from tests.helpers import (
    REPO_ROOT,
    Client,
    ServeProcess,
    keygen,
    run,
    unique,
    write_config,
)

pytestmark = pytest.mark.slow

BUILD_TIMEOUT = 300


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend is the locked one in this venv (nothing unpinned is
    # fetched), as in the README's install commands.
    result = run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_wheel_and_sdist_carry_what_the_gateway_needs_and_nothing_else(dist: Path) -> None:
    version = gateway.__version__
    [wheel] = dist.glob(f"git_gateway-{version}-py3-none-any.whl")
    [sdist] = dist.glob(f"git_gateway-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"git_gateway-{version}.dist-info/METADATA").decode()
    assert any(n.startswith("gateway/store/migrations/") and n.endswith(".sql") for n in names)
    assert any(n.startswith("gateway/store/postgres/migrations/") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    assert f"git_gateway-{version}.dist-info/licenses/LICENSE" in names
    assert f"Version: {version}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    top = f"git_gateway-{version}"
    for expected in ("LICENSE", "CHANGELOG.md", "README.md", "requirements/runtime.lock"):
        assert f"{top}/{expected}" in members, expected


def test_the_wheel_alone_serves_a_push_and_a_clone(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=BUILD_TIMEOUT)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-qq"]
    lock = REPO_ROOT / "requirements" / "runtime.lock"
    run([*pip, "--require-hashes", "-r", str(lock)], check=True, timeout=BUILD_TIMEOUT)
    [wheel] = dist.glob("*.whl")
    run([*pip, "--no-deps", str(wheel)], check=True, timeout=BUILD_TIMEOUT)
    cli = str(venv / "bin" / "git-gateway")

    # Away from the source tree, nothing but the venv can provide `gateway`.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(work), "LC_ALL": "C"}
    where = run(
        [str(venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
        cwd=work,
        env=env,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    version = run([cli, "--version"], cwd=work, env=env, check=True)
    assert (version.stdout, version.stderr) == (f"git-gateway {gateway.__version__}\n", "")

    config = write_config(tmp_path / "state")
    user, app = unique("wheel"), unique("wheelapp")
    key = keygen(tmp_path / "id")
    for args in (
        ["user", "add", user],
        ["key", "add", user, "laptop", f"{key}.pub"],
        ["app", "create", app, "--owner", user],
    ):
        run([cli, "--config", str(config), *args], cwd=work, env=env, check=True)

    served = ServeProcess(config, command=(cli,), cwd=work)
    try:
        client = Client(tmp_path / "home", key, served)  # type: ignore[arg-type]
        repo = client.new_repo(tmp_path / "work", {"README": "from the wheel\n"})
        pushed = client.git("push", client.url(app), "main", cwd=repo)
        assert "nothing deployed" in pushed.stderr
        client.git("clone", "-q", client.url(app), str(tmp_path / "copy"))
        assert (tmp_path / "copy" / "README").read_text() == "from the wheel\n"
        # The hooks the gateway wrote run the venv's interpreter and the wheel's package.
        hook = (served.config.storage.repos / ".hooks" / "pre-receive").read_text()
        assert hook.startswith(f"#!{venv / 'bin' / 'python'}"), hook.splitlines()[0]
    finally:
        assert served.stop() == 0
