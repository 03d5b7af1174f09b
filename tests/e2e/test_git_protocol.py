"""Every git operation the issue lists, with stock git and OpenSSH against the gateway."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import Client, fsck, run, server_refs


@pytest.fixture
def pushed(owner: Client, app: str, server, tmp_path: Path) -> Path:
    """A working copy with two commits on main, pushed to the app."""
    work = owner.new_repo(tmp_path / "work", {"README": "hello\n", "src/app.py": "print(1)\n"})
    owner.commit(work, {"CHANGES": "v2\n"}, "second")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    fsck(server.repo(app))
    return work


def test_clone_empty_repository(owner, app, tmp_path):
    result = owner.git("clone", owner.url(app), str(tmp_path / "empty"))
    assert "You appear to have cloned an empty repository" in result.stderr
    assert (tmp_path / "empty" / ".git").is_dir()


@pytest.mark.parametrize("form", ["ssh", "scp"])
def test_push_into_empty_then_clone(owner, app, server, tmp_path, form):
    work = owner.new_repo(tmp_path / "work")
    head = owner.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    owner.git("push", owner.url(app, form), "main", cwd=work)
    assert server_refs(server.repo(app)) == {"refs/heads/main": head}
    fsck(server.repo(app))
    owner.git("clone", "-q", owner.url(app, form), str(tmp_path / "copy"))
    assert owner.git("rev-parse", "HEAD", cwd=tmp_path / "copy").stdout.strip() == head
    assert (tmp_path / "copy" / "README").read_text() == "hello\n"


def test_incremental_fetch_and_ls_remote(owner, app, pushed, server, tmp_path):
    copy = tmp_path / "copy"
    owner.git("clone", "-q", owner.url(app), str(copy))
    new = owner.commit(pushed, {"more": "x\n"}, "third")
    owner.git("push", "-q", owner.url(app), "main", cwd=pushed)
    result = owner.git("fetch", "origin", cwd=copy)
    assert owner.git("rev-parse", "origin/main", cwd=copy).stdout.strip() == new
    assert "main" in result.stderr
    listing = owner.git("ls-remote", owner.url(app)).stdout
    assert f"{new}\trefs/heads/main" in listing
    assert f"{new}\tHEAD" in listing
    fsck(server.repo(app))


def test_branches_force_push_delete_and_tags(owner, app, pushed, server):
    url = owner.url(app)
    repo = server.repo(app)
    owner.git("checkout", "-q", "-b", "feature", cwd=pushed)
    feature = owner.commit(pushed, {"f": "1\n"}, "feature work")
    owner.git("push", "-q", url, "feature", cwd=pushed)
    assert server_refs(repo)["refs/heads/feature"] == feature
    # fast-forward
    ff = owner.commit(pushed, {"f": "2\n"}, "more feature work")
    owner.git("push", "-q", url, "feature", cwd=pushed)
    assert server_refs(repo)["refs/heads/feature"] == ff
    # non-fast-forward is rejected without --force, accepted with it
    owner.git("reset", "-q", "--hard", "HEAD~2", cwd=pushed)
    rewritten = owner.commit(pushed, {"g": "1\n"}, "rewritten")
    rejected = owner.git("push", url, "feature", cwd=pushed, check=False)
    assert rejected.returncode != 0 and "non-fast-forward" in rejected.stderr + rejected.stdout
    assert server_refs(repo)["refs/heads/feature"] == ff
    owner.git("push", "-q", "--force", url, "feature", cwd=pushed)
    assert server_refs(repo)["refs/heads/feature"] == rewritten
    # tags: lightweight and annotated
    owner.git("tag", "v1", cwd=pushed)
    owner.git("tag", "-a", "v2", "-m", "release two", cwd=pushed)
    owner.git("push", "-q", url, "--tags", cwd=pushed)
    refs = server_refs(repo)
    assert refs["refs/tags/v1"] == rewritten
    assert "refs/tags/v2" in refs
    # delete a branch and a tag
    owner.git("push", "-q", url, ":feature", ":refs/tags/v1", cwd=pushed)
    refs = server_refs(repo)
    assert "refs/heads/feature" not in refs and "refs/tags/v1" not in refs
    fsck(repo)


def test_atomic_push_is_all_or_nothing(owner, app, pushed, server):
    url = owner.url(app)
    repo = server.repo(app)
    owner.git("push", "-q", url, "main:other", cwd=pushed)  # server: other == main
    owner.git("checkout", "-q", "-b", "other", "HEAD~1", cwd=pushed)
    owner.commit(pushed, {"o": "diverged\n"}, "diverged")  # not a fast-forward of main
    owner.git("checkout", "-q", "-b", "new", "main", cwd=pushed)
    owner.commit(pushed, {"n": "1\n"}, "new branch")  # fine on its own
    before = server_refs(repo)
    result = owner.git("push", "--atomic", url, "other", "new", cwd=pushed, check=False)
    assert result.returncode != 0
    assert "atomic push failed" in result.stderr or "rejected" in result.stderr
    assert server_refs(repo) == before  # nothing moved, not even `new`
    owner.git("push", "-q", "--atomic", url, "new", "main", cwd=pushed)
    assert "refs/heads/new" in server_refs(repo)
    fsck(repo)


def test_shallow_clones(owner, app, pushed, tmp_path):
    shallow = tmp_path / "shallow"
    owner.git("clone", "-q", "--depth", "1", owner.url(app), str(shallow))
    assert owner.git("rev-list", "--count", "HEAD", cwd=shallow).stdout.strip() == "1"
    since = tmp_path / "since"
    owner.git("clone", "-q", "--shallow-since=2025-12-31", owner.url(app), str(since))
    assert int(owner.git("rev-list", "--count", "HEAD", cwd=since).stdout) >= 1
    # A shallow clone can fetch more history and push again.
    owner.git("fetch", "-q", "--deepen", "1", cwd=shallow)
    assert owner.git("rev-list", "--count", "HEAD", cwd=shallow).stdout.strip() == "2"


def test_partial_clone_with_checkout(owner, app, pushed, tmp_path):
    partial = tmp_path / "partial"
    owner.git("clone", "-q", "--filter=blob:none", owner.url(app), str(partial))
    assert (partial / "src" / "app.py").read_text() == "print(1)\n"
    assert owner.git("config", "remote.origin.partialclonefilter", cwd=partial).stdout.strip() == (
        "blob:none"
    )
    # History of the blobs is fetched lazily on demand.
    log = owner.git("log", "-p", "--format=%s", cwd=partial).stdout
    assert "second" in log and "+hello" in log


@pytest.mark.parametrize("fmt", ["tar", "zip", "tar.gz"])
def test_archive_remote(owner, app, pushed, fmt):
    argv = ["git", "archive", f"--remote={owner.url(app)}", f"--format={fmt}", "--prefix=app-1.0/"]
    result = subprocess.run(
        [*argv, "main"], env=owner.env, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(result.stdout)) as archive:
            names = archive.namelist()
    else:
        with tarfile.open(fileobj=io.BytesIO(result.stdout), mode="r:*") as archive:
            names = archive.getnames()
    assert "app-1.0/README" in names and "app-1.0/src/app.py" in names


def test_protocol_v2_when_asked_v0_otherwise(owner, app, pushed):
    env_v2 = {**owner.env, "GIT_TRACE_PACKET": "1"}
    trace = run(
        ["git", "-c", "protocol.version=2", "ls-remote", owner.url(app)], env=env_v2, check=True
    ).stderr
    assert "version 2" in trace and "command=ls-refs" in trace
    trace = run(
        ["git", "-c", "protocol.version=0", "ls-remote", owner.url(app)], env=env_v2, check=True
    ).stderr
    assert "command=ls-refs" not in trace and "version 2" not in trace


@pytest.mark.parametrize("path_form", ["'{app}.git'", "'/{app}.git'", "'~/{app}.git'", "{app}"])
@pytest.mark.parametrize("command", ["git-upload-pack", "git upload-pack"])
def test_every_path_form(owner, app, pushed, path_form, command):
    # A flush packet ends the v0 conversation right after the ref advertisement.
    result = owner.ssh(f"{command} {path_form.format(app=app)}", input="0000")
    assert result.returncode == 0, result.stderr
    assert "refs/heads/main" in result.stdout


def test_receive_pack_path_forms(owner, app, pushed):
    for form in (f"'{app}.git'", f"'/{app}.git'", f"'~/{app}.git'", app):
        result = owner.ssh(f"git-receive-pack {form}", input="0000")
        assert result.returncode == 0, result.stderr
        assert "report-status" in result.stdout
