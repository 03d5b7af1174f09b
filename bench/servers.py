"""The servers a benchmark compares: the gateway as a process, and a private OpenSSH sshd."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

TIMEOUT = 300.0


def run(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
) -> str:
    return subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout


def drain(stream: IO[str], sink: IO[str]) -> None:
    """Copy a child's log to a file in the background, so it never blocks on a full pipe."""

    def pump() -> None:
        for line in stream:
            sink.write(line)
            sink.flush()

    threading.Thread(target=pump, daemon=True).start()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / tick
    children = (int(fields[13]) + int(fields[14])) / tick
    return own, children


class Gateway:
    """The gateway started as operators start it, in a private state directory."""

    def __init__(
        self,
        state: Path,
        extra: str = "",
        database: str | None = None,
        workers: int = 1,
        repos: Path | None = None,
        host_key_dir: Path | None = None,
    ) -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        # The registry: a SQLite file in the state directory, or a postgresql:// URL. Nodes
        # of one cluster share it, the repositories root and the host keys.
        self.database = database or str(state / "gw.db")
        self.repos = repos or state / "repos"
        self.host_key_dir = host_key_dir or state / "hostkeys"
        self.config = state / "gateway.toml"
        self.control_socket = state / "gw.sock"
        self.config.write_text(
            # One process unless asked: the comparisons with OpenSSH are per process. No
            # balancer in front: a stop closes the listener at once.
            f"[server]\nworkers = {workers}\ndrain_accept_seconds = 0\n"
            "[ssh]\n"
            'listen = "127.0.0.1:0"\n'
            f'host_key_dir = "{self.host_key_dir}"\n'
            "[storage]\n"
            f'repos = "{self.repos}"\n'
            f'database = "{self.database}"\n'
            f'control_socket = "{self.control_socket}"\n'
            "[deploy]\n"
            f'log_dir = "{state / "deploys"}"\n'
            "[http]\n"
            'listen = "127.0.0.1:0"\n' + extra
        )
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def empty_pack_cache(self) -> None:
        """Drop the pack cache's entries and request markers (the default directory beside
        the control socket): the next request for anything is a first one."""
        cache = Path(f"{self.control_socket}.pack-cache")  # [git] pack_cache_dir's default
        for part in ("entries", "seen"):
            for item in (cache / part).glob("*"):
                item.unlink(missing_ok=True)

    def cli(self, *args: str, stdin: str | None = None) -> str:
        return run(
            [sys.executable, "-m", "gateway", "--config", str(self.config), *args], input=stdin
        )

    def start(self) -> None:
        log = open(self.state / "gateway.log", "w")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(self.config), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self.proc.stderr is None:  # pragma: no cover - PIPE requested
            raise RuntimeError("no stderr pipe")
        for line in self.proc.stderr:
            log.write(line)
            match = re.search(r"event=listening address=127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            raise SystemExit(f"gateway did not start; see {self.state / 'gateway.log'}")
        log.flush()  # the start's lines are on disk for whoever reads them now
        drain(self.proc.stderr, log)

    def host_keys(self) -> list[str]:
        return [
            " ".join(p.read_text().split()[:2]) for p in sorted(self.host_key_dir.glob("*.pub"))
        ]

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)


def ensure_sshd() -> str:
    """The sshd binary, installed with apt-get if it is missing (the benchmark's reference)."""
    for candidate in ("/usr/sbin/sshd", shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, timeout=TIMEOUT, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "openssh-server"],
        check=True,
        timeout=TIMEOUT,
        env=env,
    )
    return "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateSSHD:
    """OpenSSH's sshd on 127.0.0.1 with its own config, host key and authorized_keys, no PAM:
    git runs as plain commands for the current user, as a self-hosted git server would."""

    def __init__(self, state: Path, client_pubkey: str) -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.binary = ensure_sshd()
        if os.geteuid() == 0:
            # Created by the service's init script, which a private sshd does not run.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.host_key = state / "ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)])
        self.authorized_keys = state / "authorized_keys"
        self.authorized_keys.write_text(client_pubkey.strip() + "\n")
        self.authorized_keys.chmod(0o600)
        # Other local users this sshd logs in, each with its own authorized_keys (a peer such
        # as gitolite3, whose keys carry its forced command).
        self.user_keys: dict[str, Path] = {}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def write_config(self, authorized_keys: Path | None = None) -> Path:
        config = self.state / "sshd_config"
        # Match blocks come last: every line after one belongs to it.
        matches = "".join(
            f"Match User {user}\n    AuthorizedKeysFile {keys}\n"
            for user, keys in self.user_keys.items()
        )
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {authorized_keys or self.authorized_keys}\n"
            f"PidFile {self.state / 'sshd.pid'}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "MaxStartups 200:30:400\n"
            "MaxSessions 100\n"
            "PrintMotd no\n"
            "AcceptEnv GIT_PROTOCOL\n"
            "LogLevel ERROR\n" + matches
        )
        return config

    def start(self, authorized_keys: Path | None = None) -> None:
        for _ in range(5):  # sshd cannot bind port 0: pick one, retry if someone took it
            self.port = free_port()
            config = self.write_config(authorized_keys)
            self.proc = subprocess.Popen(
                [self.binary, "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if self._wait_listening():
                return
            self.stop()
        raise SystemExit("could not start the private sshd")

    def _wait_listening(self) -> bool:
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    return conn.recv(4).startswith(b"SSH-")
            except OSError:
                time.sleep(0.05)  # sshd is starting; it logs nothing at LogLevel ERROR
        return False

    def host_keys(self) -> list[str]:
        return [" ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])]

    def restart(self, authorized_keys: Path | None = None) -> None:
        self.stop()
        self.start(authorized_keys)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)
