"""The apps' bare repositories on disk: safe paths, creation and settings (dulwich), trash."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from dulwich.repo import Repo

from . import names
from .errors import AccessDenied, Conflict, NotFound

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


def git_settings(max_input_size: int) -> list[tuple[str, str]]:
    """The git config every app repository runs with, as (key, value) pairs."""
    settings = [
        ("core.logAllRefUpdates", "true"),
        # Every pushed object is checked; corrupt objects are refused...
        ("receive.fsckObjects", "true"),
        # ...but bounded, and a crafted pack cannot make receive-pack read without limit.
        ("receive.maxInputSize", str(max_input_size)),
        ("receive.denyNonFastForwards", "false"),
        # Partial clone (--filter) needs the server to honour filters and wanted blobs.
        ("uploadpack.allowFilter", "true"),
        ("uploadpack.allowAnySHA1InWant", "true"),
    ]
    for msg_id in LEGACY_FSCK_WARNINGS:
        settings.append((f"receive.fsck.{msg_id}", "warn"))
        settings.append((f"fsck.{msg_id}", "warn"))
    return settings


class Repositories:
    """Maps validated app names to `<root>/<app>.git` and manages those directories."""

    def __init__(self, root: Path, max_input_size: int) -> None:
        self.root = root.resolve()
        self.max_input_size = max_input_size

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
            try:
                config = repo.get_config()
                for key, value in git_settings(self.max_input_size):
                    section, _, name = key.rpartition(".")
                    config.set(
                        tuple(s.encode() for s in section.split(".", 1)),
                        name.encode(),
                        value.encode(),
                    )
                config.write_to_path()
            finally:
                repo.close()
            os.rename(staging / "repo.git", path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def trash(self, app: str) -> Path:
        """Move the repository aside into `<root>/.trash/<UTC time>/<app>.git` (restorable)."""
        path = self.path_for(app)
        if not path.exists():
            raise NotFound(f"no repository at {path}")
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
        target_dir = self.root / TRASH_DIR / stamp
        target_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        target = target_dir / path.name
        suffix = 1
        while target.exists():
            suffix += 1
            target = target_dir / f"{app}.{suffix}.git"
        os.rename(path, target)
        return target

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
