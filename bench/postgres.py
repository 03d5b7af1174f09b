"""A throwaway PostgreSQL server (Debian's binaries, a temporary cluster): bench and tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from .servers import free_port

TIMEOUT = 60
SUPERUSER = "gateway_test"
INSTALL_HINT = "PostgreSQL is not installed (apt-get install postgresql)"
# A scratch cluster for tests: nothing to keep, so nothing is flushed to disk.
FAST = ("-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off")
_databases = itertools.count(1)


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps one per major version)."""
    root = Path("/usr/lib/postgresql")
    found = []
    for entry in root.glob("*/bin"):
        if (entry / "initdb").is_file() and (entry / "pg_ctl").is_file():
            major = entry.parent.name
            found.append((int(major) if major.isdigit() else 0, entry))
    return max(found)[1] if found else None


class PostgresServer:
    """One cluster in a temporary directory, listening on 127.0.0.1 and a socket in it.

    initdb and postgres refuse to run as root: under root every command runs as `nobody`,
    and the directory (in the system temp dir, which `nobody` can reach, unlike pytest's or
    the benchmark's private directories) belongs to it. `durable=True` keeps PostgreSQL's
    own defaults (fsync, synchronous commit), as an operator's server would run. With a
    `password`, TCP logins need it (SCRAM): without one, any local user could log in over
    127.0.0.1 as the superuser, and run programs as the server's user (COPY ... TO PROGRAM).
    The unix socket stays password-less; it is in the server's private directory.
    """

    def __init__(self, bin_dir: Path, durable: bool = False, password: str | None = None) -> None:
        self.bin = bin_dir
        self.durable = durable
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self.port = 0
        self._as: dict[str, object] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self._as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self.root.chmod(0o700)
        auth = ["--auth=trust"]
        if password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(password + "\n")
            if self._as:
                os.chown(pwfile, self._as["user"], self._as["group"])  # type: ignore[arg-type]
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, *auth,
                      "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")  # fmt: skip
        finally:
            if password is not None:
                pwfile.unlink()
        self._run("mkdir", str(self.sockets), program="/bin/mkdir")

    def _run(self, *argv: str, program: str | None = None) -> str:
        command = [program or str(self.bin / argv[0]), *argv[1:]]
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(self.root)}
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
            cwd=self.root,
            check=False,
            **self._as,  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def start(self) -> PostgresServer:
        for _ in range(5):
            # PostgreSQL cannot listen on port 0 and report the port it got, so one is
            # picked here, and another if something took it meanwhile.
            self.port = self.port or free_port()
            options = " ".join(
                (
                    f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1",
                    "-c max_connections=200",
                    *(() if self.durable else FAST),
                )
            )
            try:
                self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
                          "-l", str(self.log), "-o", options)  # fmt: skip
                return self
            except RuntimeError:
                if "could not bind" not in self.log.read_text(errors="replace"):
                    raise
                self.port = 0
        raise RuntimeError(f"PostgreSQL found no free port:\n{self.log.read_text()}")

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.data))

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        login = SUPERUSER if self.password is None else f"{SUPERUSER}:{quote(self.password)}"
        return f"postgresql://{login}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{os.getpid()}_{next(_databases)}"
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def version(self) -> str:
        """The server's version, e.g. '15.10 (Debian 15.10-0+deb12u1)'."""
        return self.psql("SHOW server_version").strip()

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; the rows as psql prints them
        unaligned (one line each, fields separated by |)."""
        return self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
                         str(self.sockets), "-p", str(self.port), "-U", SUPERUSER, "-d",
                         database, "-c", sql)  # fmt: skip
