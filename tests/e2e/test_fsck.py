"""Object checks on push: legacy quirks accepted as real hosts do, corrupt objects refused."""

from __future__ import annotations

import subprocess

from tests.helpers import fsck, server_refs


def hash_object(client, repo, kind: str, data: bytes) -> str:
    result = subprocess.run(
        ["git", "hash-object", "-t", kind, "--literally", "-w", "--stdin"],
        input=data,
        cwd=repo,
        env=client.env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout.decode().strip()


def tree_entry(mode: bytes, name: bytes, sha: str) -> bytes:
    return mode + b" " + name + b"\x00" + bytes.fromhex(sha)


def test_zero_padded_file_mode_is_accepted(owner, app, server, tmp_path):
    work = owner.new_repo(tmp_path / "work")
    blob = owner.git("rev-parse", "HEAD:README", cwd=work).stdout.strip()
    # A tree written by an old tool: "0100644" instead of "100644" (pallets/flask has some).
    tree = hash_object(owner, work, "tree", tree_entry(b"0100644", b"README", blob))
    commit = owner.git(
        "commit-tree", tree, "-p", "HEAD", "-m", "legacy tree", cwd=work
    ).stdout.strip()
    owner.git("update-ref", "refs/heads/main", commit, cwd=work)
    result = owner.git("push", owner.url(app), "main", cwd=work)
    assert "zeroPaddedFilemode" in result.stderr  # reported as a warning, not an error
    assert server_refs(server.repo(app))["refs/heads/main"] == commit
    fsck(server.repo(app))


def test_corrupt_object_is_refused_and_nothing_changes(owner, app, server, tmp_path):
    work = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=work)
    before = server_refs(server.repo(app))
    blob = owner.git("rev-parse", "HEAD:README", cwd=work).stdout.strip()
    # The same name twice in one tree: git refuses such trees (duplicateEntries).
    tree = hash_object(
        owner,
        work,
        "tree",
        tree_entry(b"100644", b"README", blob) + tree_entry(b"100644", b"README", blob),
    )
    commit = owner.git("commit-tree", tree, "-p", "HEAD", "-m", "corrupt", cwd=work).stdout.strip()
    owner.git("update-ref", "refs/heads/main", commit, cwd=work)
    result = owner.git("push", owner.url(app), "main", cwd=work, check=False)
    assert result.returncode != 0
    assert "duplicateEntries" in result.stderr
    assert server_refs(server.repo(app)) == before
    # The objects stayed in quarantine and were dropped with it.
    missing = subprocess.run(
        ["git", "cat-file", "-e", tree],
        cwd=server.repo(app),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode != 0
    fsck(server.repo(app))
