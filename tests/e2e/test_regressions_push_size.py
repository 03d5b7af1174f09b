"""A push's work is bounded by what it costs the pusher, not by what it inflates to: a commit
message of hundreds of MiB, compressed to almost nothing, is refused before any ref moves and
never reaches the gateway's memory."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Admin, Client, ServeProcess, server_refs, write_config

MESSAGE = 400 * 1024 * 1024  # the review's figure: 400 MiB, a few hundred KB compressed


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.M)
    assert found, status
    return int(found.group(1))


def huge_commit(client: Client, repo: Path, parent: str, size: int) -> str:
    """A commit whose message is `size` bytes of one letter, made without a work tree."""
    tree = client.git("rev-parse", f"{parent}^{{tree}}", cwd=repo).stdout.strip()
    who = "Mallory <m@example.com> 1767225600 +0000"
    head = f"tree {tree}\nparent {parent}\nauthor {who}\ncommitter {who}\n\nbig\n\n".encode()
    result = subprocess.run(
        ["git", "hash-object", "-t", "commit", "-w", "--stdin"],
        input=head + b"A" * size,
        capture_output=True,
        env=client.env,
        cwd=repo,
        timeout=120,
        check=True,
    )
    return result.stdout.decode().strip()


@pytest.mark.slow
def test_regression_a_400_mib_commit_message_is_refused_and_never_read(tmp_path: Path) -> None:
    # A deploy pipeline: the push that would queue a deploy is what read the commit before.
    config = write_config(tmp_path / "gw", deploy={"command": ["true"]})
    key = Admin(config).enroll("mallory", tmp_path, "web")
    node = ServeProcess(config)
    try:
        client = Client(tmp_path / "home", key, node, name="mallory")  # type: ignore[arg-type]
        repo = client.new_repo(tmp_path / "work", {"README": "hello\n"})
        base = client.git("rev-parse", "HEAD", cwd=repo).stdout.strip()
        client.git("push", "-q", client.url("web"), "main", cwd=repo)
        before = peak_rss_kib(node.proc.pid)

        huge = huge_commit(client, repo, base, MESSAGE)
        client.git("update-ref", "refs/heads/main", huge, cwd=repo)
        pushed = client.git("push", client.url("web"), "main", cwd=repo, check=False)

        assert pushed.returncode != 0
        wanted = (
            f"push refused: commit {huge[:8]} is 400 MiB (message and headers), over this "
            "gateway's limit of 1 MiB per commit ([limits] max_commit_size)"
        )
        assert wanted in pushed.stderr, pushed.stderr
        assert server_refs(node.config.storage.repos / "web.git")["refs/heads/main"] == base
        growth = peak_rss_kib(node.proc.pid) - before
        print(f"gateway peak RSS grew by {growth} KiB for a {MESSAGE >> 20} MiB message")
        assert growth < 50 * 1024, growth
    finally:
        assert node.stop() == 0
    assert "event=push_refused app=web" in node.stderr
    assert "reason=object_too_large" in node.stderr
