"""The apps' bare repositories on disk: safe paths, creation and settings (dulwich), trash."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dulwich.object_store import (
    BaseObjectStore,
    DiskObjectStore,
    OverlayObjectStore,
)
from dulwich.objects import Commit
from dulwich.repo import Repo

from .. import names
from ..config import at_use
from ..errors import AccessDenied, Conflict, GatewayError, NotFound
from ..logs import q
from . import gitbin, hooks, packhook, repoguard

log = logging.getLogger("gateway.repos")

# Quirks found in real-world history that hosted services accept (pallets/flask carries
# zero-padded modes, old converted repos carry odd dates and timezones). Only message ids
# that git 2.30 knows may appear here: git dies on an unknown id.
LEGACY_FSCK_WARNINGS = (
    "zeroPaddedFilemode",
    "badTimezone",
    "missingSpaceBeforeDate",
    "badDate",
    "multipleAuthors",
    "missingTaggerEntry",
)

TRASH_DIR = ".trash"
# The hooks git runs for the gateway (`core.hooksPath`): one directory outside every
# repository, so nothing written into a repository can add a hook, even during a push.
HOOKS_DIR = ".hooks"
QUARANTINE_PREFIX = "tmp_objdir-incoming-"


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


def git_settings(max_input_size: int, push_options: bool = True) -> list[tuple[str, str]]:
    """The git config every app repository runs with, as (key, value) pairs
    (`push_options=False` only to recognize what earlier versions wrote)."""
    settings = [
        ("core.logAllRefUpdates", "true"),
        # Every pushed object is checked; corrupt objects are refused...
        ("receive.fsckObjects", "true"),
        # ...but bounded, and a crafted pack cannot make receive-pack read without limit.
        ("receive.maxInputSize", str(max_input_size)),
        ("receive.denyNonFastForwards", "false"),
        # Deleting the deploy branch is allowed (it deploys nothing; the gateway says so).
        ("receive.denyDeleteCurrent", "ignore"),
        # Partial clone (--filter) needs the server to honour filters and wanted blobs.
        ("uploadpack.allowFilter", "true"),
        ("uploadpack.allowAnySHA1InWant", "true"),
    ]
    if push_options:
        # `git push -o deploy.skip` and friends reach the hooks, which forward them to the
        # gateway to be checked against its allow-list (deploys/options.py).
        settings.append(("receive.advertisePushOptions", "true"))
    for msg_id in LEGACY_FSCK_WARNINGS:
        settings.append((f"receive.fsck.{msg_id}", "warn"))
        settings.append((f"fsck.{msg_id}", "warn"))
    return settings


# What dulwich's Repo.init_bare writes in [core] for a bare repository on Linux.
_BASE_CORE = (
    ("core.repositoryformatversion", "0"),
    ("core.filemode", "true"),
    ("core.bare", "true"),
)


# `info/attributes` of every app repository. It overrides the `.gitattributes` of the pushed
# tree when the gateway exports it (`git archive`, `archive --remote`): no `export-subst`
# (tenant-chosen placeholders would make git build huge files in memory and verify forged
# signatures with gpg), no filters, no `ident`, no end-of-line or encoding conversion (each
# makes git hold a whole file in memory): files are exported exactly as they were pushed.
ATTRIBUTES = b"* -export-subst -filter -ident -text -working-tree-encoding\n"


def config_text(max_input_size: int, push_options: bool = True) -> bytes:
    """The exact `config` file of every app repository: [core] as created, then
    git_settings(). Laid out as dulwich writes it, so repositories created by earlier
    versions already match byte for byte."""
    sections: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key, value in (*_BASE_CORE, *git_settings(max_input_size, push_options)):
        section, _, name = key.rpartition(".")
        head, _, sub = section.partition(".")
        items = sections.setdefault((head, sub), [])
        # A repeated key replaces the earlier one, in place (core.logAllRefUpdates).
        items[:] = [(n, v) for n, v in items if n.lower() != name.lower()]
        items.append((name, value))
    lines = []
    for (head, sub), items in sections.items():
        lines.append(f'[{head} "{sub}"]' if sub else f"[{head}]")
        lines += [f"\t{name} = {value}" for name, value in items]
    return ("\n".join(lines) + "\n").encode()


class Repositories:
    """Maps validated app names to `<root>/<app>.git` and manages those directories."""

    def __init__(
        self,
        root: Path,
        max_input_size: int,
        git: str = "git",
        max_commit_size: int | Callable[[], int] = DEFAULT_MAX_COMMIT_SIZE,
    ) -> None:
        self.root = root.resolve()
        self.max_input_size = max_input_size
        self.git = git
        # Commits and tags larger than this are never read into the gateway (pre-receive
        # refuses new ones; an older one is described, not read). A callable follows the
        # running configuration ([limits] max_commit_size is reloadable).
        self._max_commit_size = max_commit_size
        # git takes the gateway's hooks from hooks_dir only (-c core.hooksPath), so an app
        # repository's own hooks/ holds none: nothing there ever runs through the gateway.
        self.hooks = {name: hooks.script(name).encode() for name in hooks.HOOK_NAMES}
        # Not a hook git knows by name: upload-pack runs it only when told to, by path
        # (`-c uploadpack.packObjectsHook`, see packcache), instead of pack-objects.
        self.hooks[packhook.HOOK_NAME] = packhook.script().encode()
        self.layout = repoguard.Layout(
            hooks={},
            config=config_text(max_input_size),
            attributes=ATTRIBUTES,
            generated=generated_earlier,
        )

    @property
    def max_commit_size(self) -> int:
        return at_use(self._max_commit_size)

    @property
    def hooks_dir(self) -> Path:
        return self.root / HOOKS_DIR

    @property
    def pack_hook(self) -> Path:
        return self.hooks_dir / packhook.HOOK_NAME

    def ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)

    def path_for(self, app: str) -> Path:
        """The repository path of a valid app name, proven to sit directly under the root.

        The name passes the allow-list first; the resolved path is then checked too, so a
        symlink planted under the root cannot lead outside it.
        """
        names.app_name(app)
        path = (self.root / f"{app}.git").resolve()
        if path.parent != self.root or path.name != f"{app}.git":
            raise AccessDenied(app)
        return path

    def exists(self, app: str) -> bool:
        path = self.path_for(app)
        return (path / "HEAD").is_file() and (path / "objects").is_dir()

    def create(self, app: str, default_branch: str) -> Path:
        """Create the app's bare repository with HEAD on its deploy branch.

        It is built in a temporary directory under the root and renamed into place, so a
        half-created repository is never visible.
        """
        path = self.path_for(app)
        names.branch_name(default_branch)
        if path.exists():
            raise Conflict(f"a repository already exists at {path}")
        self.ensure_root()
        staging = Path(tempfile.mkdtemp(prefix=f".new-{app}-", dir=self.root))
        try:
            repo = Repo.init_bare(
                str(staging / "repo.git"), mkdir=True, default_branch=default_branch.encode()
            )
            repo.close()
            # The gateway's exact config and no hooks, as every later enforce() checks them.
            repoguard.enforce(staging / "repo.git", self.layout)
            os.rename(staging / "repo.git", path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def trash(self, app: str) -> Path:
        """Move the repository aside into `<root>/.trash/<UTC time>/<app>.git` (restorable)."""
        path = self.path_for(app)
        if not path.exists():
            raise NotFound(f"no repository at {path}")
        target = _free_name(self.trash_folder(), app, ".git")
        os.rename(path, target)
        return target

    def trash_folder(self) -> Path:
        """`<root>/.trash/<UTC time>`, created if needed."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
        folder = self.root / TRASH_DIR / stamp
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        return folder

    def trash_companion(self, app: str, trashed: Path | None, suffix: str) -> Path:
        """A free path for something trashed with the app's repository: next to it, named
        like it (`<app>[.N]<suffix>`), or in a new trash folder if it had no repository."""
        if trashed is None:
            return _free_name(self.trash_folder(), app, suffix)
        return _free_name(trashed.parent, trashed.name.removesuffix(".git"), suffix)

    def head_branch(self, app: str) -> str | None:
        """The branch HEAD points to, or None if HEAD is detached."""
        repo = Repo(str(self.path_for(app)))
        try:
            target = repo.refs.get_symrefs().get(b"HEAD")
        finally:
            repo.close()
        if target is None or not target.startswith(b"refs/heads/"):
            return None
        return target[len(b"refs/heads/") :].decode()

    # -- what a repository may hold --

    def enforce(self, app: str) -> list[repoguard.Change]:
        """Put the app's repository back to exactly the gateway's config and no hooks,
        removing anything planted (see repoguard), and check the gateway's own hooks
        directory the same way. Called at start and before every git operation; every
        change is logged. Raises OSError if something cannot be put back: git must not run
        on it then."""
        changes = self.enforce_hooks_dir()
        found = repoguard.enforce(self.path_for(app), self.layout)
        _log_changes(found, app)
        return changes + found

    def enforce_hooks_dir(self) -> list[repoguard.Change]:
        """The directory git takes hooks from (`core.hooksPath`) holds exactly ours."""
        fresh = not os.path.lexists(self.hooks_dir)
        changes = repoguard.enforce_hooks(self.hooks_dir, self.hooks, generated_earlier)
        if fresh:
            return []  # created, not repaired
        _log_changes(changes, None)
        return changes

    def remove_stale_quarantines(self, app: str, older_than: float) -> int:
        """Delete push quarantines untouched for `older_than` seconds; return how many.

        git removes its quarantine when a push fails, but not when receive-pack is killed by a
        signal while a child (unpack-objects, index-pack) still writes: that happens when the
        gateway itself dies mid-push. Their objects were never visible to the repository.
        """
        now = time.time()
        removed = 0
        for path in (self.path_for(app) / "objects").glob(f"{QUARANTINE_PREFIX}*"):
            try:
                newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])
            except FileNotFoundError:
                continue  # removed meanwhile by its own receive-pack
            if now - newest >= older_than:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed

    # -- reading commits and trees, from the repository or from a push's quarantine --

    def quarantine_path(self, app: str, raw: str) -> Path:
        """Validate a quarantine directory reported by a hook: it must be one of git's
        incoming object directories inside this app's repository."""
        objects = self.path_for(app) / "objects"
        path = Path(raw).resolve()
        if (
            path.parent != objects
            or not path.name.startswith(QUARANTINE_PREFIX)
            or not path.is_dir()
        ):
            raise GatewayError(f"invalid quarantine path for {app}")
        return path

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
            commit = store[sha.encode()]
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
                commit = store[sha.encode()]
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
            value = repo.refs.as_dict().get(ref.encode())
            return None if value is None else value.decode()
        finally:
            repo.close()


def _free_name(folder: Path, base: str, suffix: str) -> Path:
    target = folder / f"{base}{suffix}"
    number = 1
    while os.path.lexists(target):
        number += 1
        target = folder / f"{base}.{number}{suffix}"
    return target


def _log_changes(changes: list[repoguard.Change], app: str | None) -> None:
    where = f"app={app} " if app else ""
    for change in changes:
        if change.action == "updated":  # the gateway's own file, from an earlier version
            log.info("event=repo_file_updated %spath=%s", where, q(change.path))
        else:
            log.warning(
                "event=repo_planted_removed %spath=%s action=%s",
                where,
                q(change.path),
                change.action,
            )


_SHEBANG = re.compile(rb"#!(\S+) (-IS?)\n")
_PACK_HOOK = re.compile(rb"#!(\S+) -IS\n(?:.*\n)*?sys\.path\.insert\(0, '([^'\n]*)'\)\n")
_MAX_INPUT = re.compile(rb"\n\tmaxInputSize = (\d{1,20})\n")


def generated_earlier(name: str, content: bytes) -> bool:
    """Is this a file the gateway itself wrote, for another interpreter path (a new
    virtualenv, a Python upgrade) or another [git] max_input_size?"""
    if name == "config":
        found = _MAX_INPUT.search(content)
        return found is not None and any(
            content == config_text(int(found.group(1)), options) for options in (True, False)
        )
    if name == packhook.HOOK_NAME:
        found = _PACK_HOOK.match(content)
        if found is None:
            return False
        python, root = (os.fsdecode(g) for g in found.groups())
        return any(
            content == packhook.script(python, root, module).encode()
            for module in (packhook.MODULE, packhook.EARLIER_MODULE)
        )
    if name in hooks.HOOK_NAMES:
        found = _SHEBANG.match(content)
        if found is None:
            return False
        python, isolation = (os.fsdecode(g) for g in found.groups())
        return any(
            content == hooks.script(name, python, isolation, options).encode()
            for options in (True, False)
        )
    return False
