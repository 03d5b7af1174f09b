"""Reading a repository's objects without trusting them: sizes first, commits only when small
(a tenant's commit message can be gigabytes), and refs."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from dulwich.object_store import BaseObjectStore, DiskObjectStore, OverlayObjectStore
from dulwich.objects import Commit, ObjectID
from dulwich.refs import Ref
from dulwich.repo import Repo

from ..errors import GatewayError
from . import gitbin

# A commit too large to read into the gateway is described rather than shown.
TOO_LARGE = "(a commit larger than [limits] max_commit_size: not shown)"
TOO_COSTLY = "(a commit stored as too long a chain of deltas: not shown)"
# Delta chains: git never packs one longer (pack.depth's maximum); a read may inflate this
# many times max_commit_size along one.
MAX_CHAIN = 4095
CHAIN_BUDGET = 16
DEFAULT_MAX_COMMIT_SIZE = 1024**2
GIT_READ_TIMEOUT = 60
# Objects over max_commit_size whose type is asked of git at once.
TYPE_BATCH = 1024


@dataclass(frozen=True)
class CommitInfo:
    subject: str
    author: str


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class ObjectReads:
    """The object-reading half of `Repositories` (a mixin: it needs `root`, `git`,
    `max_commit_size` and `path_for`). Blocking: run off the loop."""

    root: Path
    git: str
    max_commit_size: int

    def path_for(self, app: str) -> Path:
        raise NotImplementedError

    def _open(self, app: str, quarantine: Path | None) -> tuple[Repo, BaseObjectStore]:
        repo = Repo(str(self.path_for(app)))
        if quarantine is None:
            return repo, repo.object_store
        return repo, OverlayObjectStore([DiskObjectStore(str(quarantine)), repo.object_store])

    def _git_env(
        self, app: str, quarantine: Path | None, alternates: bool = True
    ) -> dict[str, str]:
        """git's environment for reading `app`'s objects, a push's quarantine first (with
        the repository's own objects as alternates unless `alternates` is false)."""
        extra = {"GIT_DIR": str(self.path_for(app))}
        if quarantine is not None:
            extra["GIT_OBJECT_DIRECTORY"] = str(quarantine)
            if alternates:
                extra["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = str(self.path_for(app) / "objects")
        return gitbin.environment(self.root, **extra)

    def _cat_file(
        self, app: str, quarantine: Path | None, argv: list[str], stdin: bytes = b""
    ) -> list[list[bytes]]:
        """Lines `git cat-file ARGV` prints (blocking; run off the loop), each split; git's
        own memory, never the gateway's, for whatever it reads."""
        env = self._git_env(app, quarantine, alternates="--batch-all-objects" not in argv)
        result = subprocess.run(
            [self.git, "cat-file", *argv],
            input=stdin,
            capture_output=True,
            env=env,
            timeout=GIT_READ_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise GatewayError(f"git cat-file failed: {_decode(result.stderr).strip()[:200]}")
        return [line.split() for line in result.stdout.splitlines()]

    def oversized_object(self, app: str, quarantine: Path) -> tuple[str, str, int] | None:
        """(sha, type, size) of the first commit or tag among a push's new objects (its
        quarantine) over max_commit_size: sizes come from the objects' headers, nothing is
        inflated. The quarantine holds exactly what this push brought."""
        # Streamed, never collected: a push within max_input_size can hold tens of millions
        # of tiny objects, whose listing took the gateway ~400 bytes each (200000 in an 8 MiB
        # pack: 81 MB). --unordered: git need not sort them either. Sizes only: git finds a
        # delta's type by walking its chain to the base, so a 400 KB pack of 20000 chained
        # deltas took 8 s (quadratic: 60000 held a core and a blocking thread past the
        # timeout); only the few objects over the limit have their type asked.
        check = "--batch-check=%(objectsize) %(objectname)"
        argv = [self.git, "cat-file", "--batch-all-objects", "--unordered", check]
        env = self._git_env(app, quarantine, alternates=False)
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, env=env
            )
            # The read blocks: the timer bounds it as run()'s timeout did.
            timer = threading.Timer(GIT_READ_TIMEOUT, process.kill)
            timer.start()
            found = None
            listed = False
            try:
                large: dict[str, int] = {}
                for line in process.stdout or ():
                    fields = line.split()
                    if len(fields) == 2 and fields[0].isdigit():
                        size, name = int(fields[0]), fields[1].decode()
                        if size > self.max_commit_size:
                            large[name] = size
                    if len(large) >= TYPE_BATCH:
                        if found := self._commit_or_tag(app, quarantine, large):
                            break
                        large.clear()
                else:
                    listed = True
                    found = self._commit_or_tag(app, quarantine, large) if large else None
            finally:
                if not listed:  # the first oversized object is enough (or this failed)
                    process.kill()
                returncode = process.wait()
                timed_out = not timer.is_alive()
                timer.cancel()
                if process.stdout is not None:
                    process.stdout.close()
            if found is not None:
                return found
            if returncode != 0:
                errors.seek(0)
                reason = _decode(errors.read(4096)).strip()[:200] or f"exit {returncode}"
                if timed_out:
                    reason = f"no answer within {GIT_READ_TIMEOUT} s"
                raise GatewayError(f"git cat-file failed: {reason}")
        return None

    def _commit_or_tag(
        self, app: str, quarantine: Path, sizes: dict[str, int]
    ) -> tuple[str, str, int] | None:
        """The first commit or tag among these objects of a push, with its size."""
        stdin = "".join(f"{sha}\n" for sha in sizes).encode()
        check = "--batch-check=%(objecttype) %(objectname)"
        for line in self._cat_file(app, quarantine, [check], stdin):
            if len(line) == 2 and line[0] in (b"commit", b"tag"):
                name = line[1].decode()
                return name, line[0].decode(), sizes[name]
        return None

    def _sizes(self, app: str, shas: list[str], quarantine: Path | None) -> dict[str, int]:
        """Each object's size from its header (missing objects are left out)."""
        check = "--batch-check=%(objectname) %(objectsize)"
        stdin = "".join(f"{sha}\n" for sha in shas).encode()
        lines = self._cat_file(app, quarantine, [check], stdin)
        return {line[0].decode(): int(line[1]) for line in lines if len(line) == 2}

    def _readable(self, app: str, shas: list[str], quarantine: Path | None) -> dict[str, str]:
        """Why each of `shas` is not read into the gateway, or "" if it may be: over
        max_commit_size (or missing), or stored as a delta chain too costly to resolve."""
        sizes = self._sizes(app, shas, quarantine)
        why = {sha: "" if sizes.get(sha, -1) in range(self.max_commit_size + 1) else TOO_LARGE
               for sha in shas}  # fmt: skip
        small = [sha for sha in shas if not why[sha]]
        for sha in self._costly(app, small, quarantine):
            why[sha] = TOO_COSTLY
        return why

    def _costly(self, app: str, shas: list[str], quarantine: Path | None) -> set[str]:
        """Those of `shas` whose delta chain is longer than git ever packs (MAX_CHAIN) or
        inflates more than CHAIN_BUDGET times max_commit_size. Review 2: a commit within the
        limit may be the last of thousands of deltas, each as large (2000 of 500 KB: a
        60 KB push); reading it applied them all, in a blocking thread, at every read. The
        chain is walked from git's headers (%(deltabase)), one object at a time."""
        if not shas:
            return set()
        check = "--batch-check=%(objectsize) %(deltabase)"
        process = subprocess.Popen(
            [self.git, "cat-file", check],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self._git_env(app, quarantine),
        )
        timer = threading.Timer(GIT_READ_TIMEOUT, process.kill)
        timer.start()
        costly = set()
        try:
            if process.stdin is None or process.stdout is None:  # pragma: no cover
                raise GatewayError("git cat-file has no pipes")
            for sha in shas:
                name, inflated = sha, 0
                for _ in range(MAX_CHAIN + 1):
                    process.stdin.write(f"{name}\n".encode())
                    process.stdin.flush()
                    fields = process.stdout.readline().split()
                    if len(fields) != 2 or not fields[0].isdigit():
                        break  # missing: whoever reads it finds out
                    inflated += int(fields[0])
                    if set(fields[1]) == {ord("0")}:
                        break  # the chain's base: not a delta
                    if inflated > CHAIN_BUDGET * self.max_commit_size:
                        costly.add(sha)
                        break
                    name = fields[1].decode()
                else:
                    costly.add(sha)
        except (BrokenPipeError, ValueError):
            raise GatewayError("git cat-file stopped answering") from None
        finally:
            process.kill()
            process.wait()
            timer.cancel()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        return costly

    def commit_info(self, app: str, sha: str, quarantine: Path | None = None) -> CommitInfo:
        refused = self._readable(app, [sha], quarantine)[sha]
        if refused:
            return CommitInfo(refused, "")
        repo, store = self._open(app, quarantine)
        try:
            commit = store[ObjectID(sha.encode())]
            if not isinstance(commit, Commit):
                return CommitInfo("", "")
            subject = _decode(commit.message).strip().splitlines()
            return CommitInfo(subject[0][:200] if subject else "", _decode(commit.author)[:200])
        finally:
            repo.close()

    def commits_between(
        self, app: str, old: str, new: str, limit: int, quarantine: Path | None = None
    ) -> list[dict[str, object]]:
        """Commits reachable from `new` but not `old`, newest first (webhook payloads). git
        lists them; only those within max_commit_size are read into the gateway."""
        argv = [self.git, "rev-list", f"--max-count={limit}", new]
        if set(old) != {"0"}:
            argv.append(f"^{old}")
        listed = subprocess.run(
            argv,
            capture_output=True,
            env=self._git_env(app, quarantine),
            timeout=GIT_READ_TIMEOUT,
            check=False,
        )
        if listed.returncode != 0:
            raise GatewayError(f"git rev-list failed: {_decode(listed.stderr).strip()[:200]}")
        shas = [line.decode() for line in listed.stdout.split()][:limit]
        readable = self._readable(app, shas, quarantine)
        repo, store = self._open(app, quarantine)
        try:
            commits: list[dict[str, object]] = []
            for sha in shas:
                if readable[sha]:
                    commits.append(
                        {"id": sha, "message": readable[sha], "author": "", "timestamp": 0}
                    )
                    continue
                commit = store[ObjectID(sha.encode())]
                if not isinstance(commit, Commit):  # rev-list lists commits only
                    continue
                commits.append(
                    {
                        "id": commit.id.decode(),
                        "message": _decode(commit.message)[:4000],
                        # Bounded as the message is: an author line may be most of a
                        # commit (review 2: 20 of 1 MiB each made a 20 MiB webhook body,
                        # encoded and signed on the event loop).
                        "author": _decode(commit.author)[:200],
                        "timestamp": commit.commit_time,
                    }
                )
            return commits
        finally:
            repo.close()

    def read_ref(self, app: str, ref: str) -> str | None:
        repo = Repo(str(self.path_for(app)))
        try:
            value = repo.refs.as_dict().get(Ref(ref.encode()))
            return None if value is None else value.decode()
        finally:
            repo.close()
