"""The gitolite3 peer: Debian's gitolite under its own unix user, behind the private sshd."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import IO

from gateway.git.repos import git_settings

from .servers import TIMEOUT

USER = "gitolite-bench"  # a system user of the benchmark's own, never Debian's `gitolite3`
HOME = Path("/var/lib/gitolite-bench")
LOCK = Path("/run/lock/gitolite-bench.lock")
INSTALL_HINT = "apt-get install gitolite3"


def unavailable() -> str | None:
    """Why the gitolite peer cannot run here, or None."""
    if shutil.which("gitolite") is None:
        return f"gitolite3 is not installed ({INSTALL_HINT})"
    if os.geteuid() != 0:
        return "it needs its own unix user, and the benchmark is not running as root"
    return None


class Gitolite:
    """gitolite3 set up from scratch for one run: `gitolite setup -pk` as its own user (created
    if missing, its home emptied first), the benchmark's repository and the empty ones the
    pushes go to, declared in gitolite.conf, all with the gateway's git settings."""

    def __init__(self) -> None:
        self.lock: IO[str] | None = None

    def acquire(self) -> str | None:
        """Hold the peer for this run; the reason it is busy, or None."""
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        lock = open(LOCK, "w")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return "another benchmark run is using it"
        self.lock = lock
        return None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def repos(self) -> Path:
        return HOME / "repositories"

    def authorized_keys(self) -> Path:
        return HOME / ".ssh" / "authorized_keys"

    def as_user(self, argv: list[str], cwd: Path | None = None) -> str:
        env = {
            "HOME": str(HOME),
            "USER": USER,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "GIT_CONFIG_NOSYSTEM": "1",
        }
        return subprocess.run(
            argv,
            user=USER,
            group=USER,
            extra_groups=[],
            env=env,
            cwd=cwd or HOME,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        ).stdout

    def ensure_user(self) -> None:
        try:
            entry = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(
                [
                    *("useradd", "--system", "--user-group", "--create-home"),
                    *("--home-dir", str(HOME), "--shell", "/bin/sh", USER),
                ],
                check=True,
                timeout=TIMEOUT,
                capture_output=True,
            )
            entry = pwd.getpwnam(USER)
        if Path(entry.pw_dir) != HOME:
            raise SystemExit(f"user {USER} exists with home {entry.pw_dir}, not {HOME}")
        # No password, but not locked ("!"): sshd without PAM refuses locked accounts.
        subprocess.run(
            ["usermod", "-p", "*", USER], check=True, timeout=TIMEOUT, capture_output=True
        )

    def setup(self, pubkey: str, source: Path, push_repos: list[str]) -> None:
        self.ensure_user()
        entry = pwd.getpwnam(USER)
        shutil.rmtree(HOME, ignore_errors=True)  # the previous run's state, all of it
        HOME.mkdir(mode=0o755)
        os.chown(HOME, entry.pw_uid, entry.pw_gid)
        # gitolite names the user after the key file: "bench".
        (HOME / "bench.pub").write_text(pubkey)
        os.chown(HOME / "bench.pub", entry.pw_uid, entry.pw_gid)
        self.as_user(["git", "config", "--global", "init.defaultBranch", "main"])
        self.as_user(["gitolite", "setup", "-pk", "bench.pub"])
        conf = HOME / ".gitolite" / "conf" / "gitolite.conf"
        conf.write_text(
            "repo gitolite-admin\n    RW+ = bench\n\n"
            f"repo bench {' '.join(push_repos)}\n    RW+ = bench\n"
        )
        shutil.copytree(source, self.repos / "bench.git", symlinks=True)
        for path in [conf, *(self.repos / "bench.git").rglob("*"), self.repos / "bench.git"]:
            os.lchown(path, entry.pw_uid, entry.pw_gid)
        # Edited in place rather than pushed to gitolite-admin: setup compiles the conf,
        # creates the new repositories and installs gitolite's hooks in every one.
        self.as_user(["gitolite", "setup"])
        for name in push_repos:
            for key, value in git_settings(2 * 1024**3):
                self.as_user(["git", "config", key, value], cwd=self.repos / f"{name}.git")

    def remove(self) -> None:
        """Empty the peer's home (a copy of the benchmark's repository) and let it go."""
        try:
            shutil.rmtree(HOME, ignore_errors=True)
        finally:
            self.release()
