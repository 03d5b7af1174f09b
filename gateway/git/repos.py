"""The apps' bare repositories on disk: safe paths, creation and settings (dulwich), trash."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from dulwich.refs import Ref
from dulwich.repo import Repo

from .. import names
from ..errors import AccessDenied, Conflict, GatewayError, NotFound
from ..logs import q
from . import hooks, packhook, repoguard
from .objects import DEFAULT_MAX_COMMIT_SIZE, TOO_COSTLY, TOO_LARGE, CommitInfo, ObjectReads  # noqa: F401 - callers import them from here

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


class Repositories(ObjectReads):
    """Maps validated app names to `<root>/<app>.git` and manages those directories (reading
    their objects is ObjectReads', in objects.py)."""

    def __init__(
        self,
        root: Path,
        max_input_size: int,
        git: str = "git",
        max_commit_size: int = DEFAULT_MAX_COMMIT_SIZE,
    ) -> None:
        self.root = root.resolve()
        self.max_input_size = max_input_size
        self.git = git
        # Commits and tags larger than this are never read into the gateway (pre-receive
        # refuses new ones; an older one is described, not read).
        self.max_commit_size = max_commit_size
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
            target = repo.refs.get_symrefs().get(Ref(b"HEAD"))
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
