"""A deterministic repository generator (seeded), written through `git fast-import`.

Profiles: `tiny` (the test suite), `small` (about a 10 MB pack, seconds to build, CI) and
`large` (2,000 commits, 3,000 files, some incompressible blobs: a 50-100 MB pack).
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

WORDS = [
    "alpha", "beta", "gamma", "delta", "deploy", "build", "cache", "route", "handler",
    "request", "response", "config", "service", "worker", "queue", "retry", "timeout",
    "branch", "commit", "merge", "stream", "buffer", "socket", "token",
]  # fmt: skip


@dataclass(frozen=True)
class Profile:
    commits: int
    files: int
    binaries: int  # incompressible blobs, spread over the history
    binary_size: int
    edits_per_commit: int


PROFILES = {
    "tiny": Profile(commits=15, files=30, binaries=1, binary_size=32 * 1024, edits_per_commit=3),
    "small": Profile(
        commits=300, files=400, binaries=8, binary_size=1024 * 1024, edits_per_commit=5
    ),
    "large": Profile(
        commits=2000, files=3000, binaries=45, binary_size=1536 * 1024, edits_per_commit=6
    ),
}


def _text(rng: random.Random, lines: int) -> bytes:
    return "".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "\n" for _ in range(lines)
    ).encode()


def _data(payload: bytes) -> bytes:
    return b"data %d\n" % len(payload) + payload + b"\n"


def generate(path: Path, profile: Profile, seed: int = 42) -> None:
    """Create a bare repository at `path` with the profile's history on `main`."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True, timeout=60)
    proc = subprocess.Popen(
        ["git", "fast-import", "--quiet"],
        cwd=path,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    if proc.stdin is None:  # pragma: no cover - PIPE requested
        raise RuntimeError("no stdin pipe")
    out = proc.stdin
    contents = {
        f"src/mod{i % 37}/file{i}.txt": _text(rng, rng.randint(20, 120))
        for i in range(profile.files)
    }
    binary_at = {rng.randrange(profile.commits) for _ in range(profile.binaries)}
    mark = 0
    when = 1_700_000_000
    for number in range(profile.commits):
        changed: dict[str, bytes] = {}
        if number == 0:
            changed = dict(contents)
        else:
            for _ in range(profile.edits_per_commit):
                name = rng.choice(list(contents))
                contents[name] = contents[name] + _text(rng, rng.randint(1, 8))
                changed[name] = contents[name]
        if number in binary_at:
            changed[f"assets/blob{number}.bin"] = rng.randbytes(profile.binary_size)
        commands = []
        for name, payload in changed.items():
            mark += 1
            out.write(b"blob\nmark :%d\n" % mark + _data(payload))
            commands.append(b"M 100644 :%d %s\n" % (mark, name.encode()))
        when += 3600
        stamp = b"%d +0000" % when
        out.write(b"commit refs/heads/main\n")
        out.write(b"author Bench <bench@example.com> " + stamp + b"\n")
        out.write(b"committer Bench <bench@example.com> " + stamp + b"\n")
        out.write(_data(f"change {number}: {rng.choice(WORDS)} {rng.choice(WORDS)}".encode()))
        out.writelines(commands)
        out.write(b"\n")
    out.close()
    if proc.wait(3600) != 0:
        raise RuntimeError("git fast-import failed")
    # One well-packed repository, as a long-lived server repository would be.
    subprocess.run(["git", "repack", "-adq"], cwd=path, check=True, timeout=3600)


def pack_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "objects" / "pack").glob("*.pack"))
