"""Commits and tags are read into the gateway only within [limits] max_commit_size: a push's
oversized objects are found from their headers, and reading one never inflates it here."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from gateway.git.repos import TOO_COSTLY, TOO_LARGE, Repositories

LIMIT = 64 * 1024
BIG = 8 * 1024 * 1024  # a message far over the limit (compresses to a few KiB)


def git(repo: Path, *args: str, stdin: bytes = b"", objects: Path | None = None) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "GIT_DIR": str(repo),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    if objects is not None:  # as receive-pack's quarantine: new objects apart
        env["GIT_OBJECT_DIRECTORY"] = str(objects)
        env["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = str(repo / "objects")
    result = subprocess.run(
        ["git", *args], input=stdin, capture_output=True, env=env, timeout=60, check=True
    )
    return result.stdout.decode().strip()


def commit(repo: Path, message: bytes, parent: str = "", objects: Path | None = None) -> str:
    tree = git(repo, "mktree", objects=objects)
    head = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "")
    who = "A <a@example.com> 1767225600 +0000"
    head += f"author {who}\ncommitter {who}\n\n"
    return git(repo, "hash-object", "-t", "commit", "-w", "--stdin",
               stdin=head.encode() + message, objects=objects)  # fmt: skip


@pytest.fixture
def repos(tmp_path: Path) -> Repositories:
    repos = Repositories(tmp_path / "repos", 1024**3, max_commit_size=LIMIT)
    repos.create("web", "main")
    return repos


def test_a_push_with_a_commit_over_the_limit_is_found_from_headers(repos: Repositories) -> None:
    repo = repos.path_for("web")
    base = commit(repo, b"base\n")
    quarantine = repo / "objects" / "tmp_objdir-incoming-x"
    quarantine.mkdir()
    small = commit(repo, b"fine\n", base, objects=quarantine)
    assert repos.oversized_object("web", quarantine) is None
    # A big blob is a file, bounded elsewhere (max_input_size, the export): not this limit.
    git(repo, "hash-object", "-w", "--stdin", stdin=b"x" * BIG, objects=quarantine)
    assert repos.oversized_object("web", quarantine) is None
    huge = commit(repo, b"subject\n\n" + b"A" * BIG, small, objects=quarantine)
    sha, kind, size = repos.oversized_object("web", quarantine) or ("", "", 0)
    assert (sha, kind) == (huge, "commit") and size > BIG


def test_an_annotated_tag_over_the_limit_is_found_too(repos: Repositories) -> None:
    repo = repos.path_for("web")
    target = commit(repo, b"base\n")
    quarantine = repo / "objects" / "tmp_objdir-incoming-y"
    quarantine.mkdir()
    tag = f"object {target}\ntype commit\ntag v1\ntagger A <a@example.com> 1767225600 +0000\n\n"
    git(repo, "hash-object", "-t", "tag", "-w", "--stdin",
        stdin=tag.encode() + b"T" * BIG, objects=quarantine)  # fmt: skip
    assert (repos.oversized_object("web", quarantine) or ("", ""))[1] == "tag"


def test_regression_reading_a_huge_commit_never_inflates_it_in_the_gateway(
    repos: Repositories,
) -> None:
    """Queueing a deploy read the whole commit to take its subject: a 400 MiB message pushed
    in a few hundred KB took the gateway to 1.7 GB. Now its size is asked of git first."""
    repo = repos.path_for("web")
    base = commit(repo, b"base\n")
    huge = commit(repo, b"huge subject\n\n" + b"A" * BIG, base)
    tracemalloc.start()
    try:
        info = repos.commit_info("web", huge)
        listed = repos.commits_between("web", base, huge, limit=20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.subject == TOO_LARGE and info.author == ""
    assert [c["message"] for c in listed] == [TOO_LARGE]
    assert peak < BIG // 8, peak


def test_commits_within_the_limit_read_as_before(repos: Repositories) -> None:
    repo = repos.path_for("web")
    first = commit(repo, b"first\n")
    second = commit(repo, b"second subject\n\nbody\n", first)
    info = repos.commit_info("web", second)
    assert (info.subject, info.author) == ("second subject", "A <a@example.com>")
    listed = repos.commits_between("web", "0" * 40, second, limit=20)
    assert [c["id"] for c in listed] == [second, first]
    assert listed[0]["message"] == "second subject\n\nbody\n"
    assert repos.commits_between("web", first, second, limit=20)[0]["id"] == second
    assert len(repos.commits_between("web", "0" * 40, second, limit=1)) == 1


def test_regression_many_tiny_objects_never_collect_in_the_gateway(repos: Repositories) -> None:
    """Review 2: the quarantine's listing was read whole into the gateway, ~400 bytes an
    object: 100000 one-line blobs (a 4 MiB pack) took 40 MB, and max_input_size (2G) lets one
    push bring tens of millions (an OOM for every tenant). Now it is streamed."""
    repo = repos.path_for("web")
    quarantine = repo / "objects" / "tmp_objdir-incoming-many"
    (quarantine / "pack").mkdir(parents=True)
    count = 100_000
    stream = b"".join(b"blob\ndata %d\n%d\n" % (len(str(i)) + 1, i) for i in range(count))
    env = {
        "PATH": os.environ["PATH"],
        "GIT_DIR": str(repo),
        "GIT_OBJECT_DIRECTORY": str(quarantine),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    subprocess.run(["git", "fast-import", "--quiet"], input=stream, env=env, timeout=60, check=True)
    tracemalloc.start()
    try:
        assert repos.oversized_object("web", quarantine) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak
    huge = commit(repo, b"subject\n\n" + b"A" * BIG, objects=quarantine)
    tracemalloc.start()
    try:
        found = repos.oversized_object("web", quarantine)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found is not None and found[0] == huge
    assert peak < 2 * 1024 * 1024, peak


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def chained_deltas(count: int, first: bytes = b"%011d\n" % 0, kind: int = 3) -> bytes:
    """A pack a hostile client can send: one object (`kind` 3: a blob, 1: a commit ending in
    12 bytes to vary), then `count - 1` deltas, each based on the one before (OFS_DELTA):
    the same object but for its last 12 bytes (the i-th delta's: b"%011d\\n" % i)."""

    def header(kind: int, size: int) -> bytes:
        out, byte, size = bytearray(), (kind << 4) | (size & 0x0F), size >> 4
        while size:
            out.append(byte | 0x80)
            byte, size = size & 0x7F, size >> 7
        return bytes(out + bytes([byte]))

    def distance(n: int) -> bytes:
        out = [n & 0x7F]
        n >>= 7
        while n:
            n -= 1
            out.append(0x80 | (n & 0x7F))
            n >>= 7
        return bytes(reversed(out))

    size, keep = len(first), len(first) - 12
    copy = bytes([0x80 | 0x10 | 0x20 | 0x40, keep & 0xFF, (keep >> 8) & 0xFF, keep >> 16])
    body, previous = bytearray(), 12
    body += header(kind, size) + zlib.compress(first)
    for i in range(1, count):
        data = b"%011d\n" % i
        delta = _varint(size) + _varint(size) + (copy if keep else b"") + bytes([12]) + data
        here = 12 + len(body)
        body += header(6, len(delta)) + distance(here - previous) + zlib.compress(delta)
        previous = here
    pack = b"PACK" + struct.pack(">II", 2, count) + bytes(body)
    return pack + hashlib.sha1(pack, usedforsecurity=False).digest()  # the pack format


def test_regression_a_chain_of_deltas_costs_the_check_no_more_than_its_length(
    repos: Repositories,
) -> None:
    """Review 2: git finds a delta's type by walking its chain down to the base, so asking
    every new object's type cost the square of a chain's length: 30000 chained deltas (a
    600 KB push) took ~19 s, 60000 held a core and one of the gateway's 8 blocking threads
    for the whole 60 s timeout. Sizes are read from the deltas' own headers."""
    repo = repos.path_for("web")
    quarantine = repo / "objects" / "tmp_objdir-incoming-chain"
    (quarantine / "pack").mkdir(parents=True)
    git(repo, "index-pack", "--stdin", stdin=chained_deltas(30_000), objects=quarantine)
    asked: list[dict[str, int]] = []
    ask = repos._commit_or_tag

    def spy(app: str, where: Path, large: dict[str, int]) -> object:
        asked.append(dict(large))
        return ask(app, where, large)

    repos._commit_or_tag = spy  # type: ignore[method-assign]
    # A ratio, not a time: against git listing the same sizes in the same run (the reference
    # costs what the check must cost; asking every type cost ~400 times more here).
    started = time.monotonic()
    git(repo, "cat-file", "--batch-all-objects", "--batch-check=%(objectsize)", objects=quarantine)
    reference = time.monotonic() - started
    started = time.monotonic()
    assert repos.oversized_object("web", quarantine) is None
    took = time.monotonic() - started
    print(f"check {took * 1000:.0f} ms, git's own size listing {reference * 1000:.0f} ms")
    assert asked == []  # no object under the limit had its type asked
    assert took < 20 * reference + 0.5
    # A commit over the limit is still found among them.
    huge = commit(repo, b"subject\n\n" + b"A" * BIG, objects=quarantine)
    assert (repos.oversized_object("web", quarantine) or ("",))[0] == huge


def test_regression_a_huge_author_line_is_cut_in_webhook_commits(repos: Repositories) -> None:
    """Review 2: the webhook payload bounded each commit's message (4000 characters) but not
    its author line, which may fill a commit within max_commit_size (1 MiB by default): 20
    commits made a 20 MiB body, JSON-encoded and signed on the gateway's event loop."""
    repo = repos.path_for("web")
    tree = git(repo, "mktree")
    who = "X" * (LIMIT // 2 - 1024) + " <a@example.com> 1767225600 +0000"
    raw = f"tree {tree}\nauthor {who}\ncommitter {who}\n\nsubject\n".encode()
    sha = git(repo, "hash-object", "-t", "commit", "-w", "--stdin", stdin=raw)
    (listed,) = repos.commits_between("web", "0" * 40, sha, limit=20)
    assert listed["message"] == "subject\n"
    assert len(str(listed["author"])) <= 200


def _commit_chain(repos: Repositories, count: int, message_size: int) -> str:
    """A chain of `count` commits, each a delta of the one before (as chained_deltas), in
    the repository; the last one's sha."""
    repo = repos.path_for("web")
    tree = git(repo, "mktree")
    who = "A <a@example.com> 1767225600 +0000"
    head = f"tree {tree}\nauthor {who}\ncommitter {who}\n\nsubject\n\n".encode()
    head += b"B" * message_size
    git(repo, "index-pack", "--stdin",
        stdin=chained_deltas(count, head + b"%011d\n" % 0, kind=1))  # fmt: skip
    last = head + b"%011d\n" % (count - 1)
    return git(repo, "hash-object", "-t", "commit", "--stdin", stdin=last)


def test_regression_a_commit_at_the_end_of_a_long_delta_chain_is_not_read(
    repos: Repositories,
) -> None:
    """Review 2: a commit within max_commit_size may be stored as the last of thousands of
    deltas, each of a commit as large: 2000 of 500 KB (a 60 KB push) cost 0.7 s of a
    blocking thread at every read (deploy subject, webhook). A chain that inflates more than
    16 times the limit, or is longer than git ever packs, is described, not read."""
    short = _commit_chain(repos, 4, LIMIT // 2)  # 4 x 32 KiB: read as any commit
    assert repos.commit_info("web", short).subject == "subject"
    costly = _commit_chain(repos, 40, LIMIT - 1024)  # 40 x 63 KiB > 16 x 64 KiB
    assert repos.commit_info("web", costly).subject == TOO_COSTLY
    listed = repos.commits_between("web", "0" * 40, costly, limit=1)
    assert [c["message"] for c in listed] == [TOO_COSTLY]
    deep = _commit_chain(repos, 5000, 0)  # tiny, but deeper than git's 4095
    assert repos.commit_info("web", deep).subject == TOO_COSTLY
