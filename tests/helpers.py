"""Test helpers: isolated git/ssh clients, a gateway running in its own thread, key files."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import cli
from gateway import config as gwconfig
from gateway.app import Gateway

TIMEOUT = 60
_counter = itertools.count(1)


def unique(prefix: str) -> str:
    """A fresh name for users and apps, so tests sharing one gateway never collide."""
    return f"{prefix}{next(_counter)}"


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: bytes | str | None = None,
    check: bool = False,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; text output; raises with both streams if check fails."""
    if isinstance(input, bytes):
        input = input.decode()
    result = subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def keygen(path: Path, kind: str = "ed25519", bits: int | None = None, comment: str = "") -> Path:
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path), "-C", comment or path.name]
    if bits:
        argv += ["-b", str(bits)]
    run(argv, check=True)
    return path


def keygen_fingerprint(pub: Path, md5: bool = False) -> str:
    argv = ["ssh-keygen", "-l", "-f", str(pub)]
    if md5:
        argv[1:1] = ["-E", "md5"]
    return run(argv, check=True).stdout.split()[1]


@dataclass
class Admin:
    """Runs the operator CLI in-process against the test gateway's config file."""

    config_path: Path

    def __call__(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        old_stdin = None
        if stdin is not None:
            import sys

            old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            code = cli.main(["--config", str(self.config_path), *args], out=out, err=err)
        finally:
            if old_stdin is not None:
                import sys

                sys.stdin = old_stdin
        return code, out.getvalue(), err.getvalue()

    def ok(self, *args: str, stdin: str | None = None) -> str:
        code, out, err = self(*args, stdin=stdin)
        assert code == 0, f"{args} -> {code}: {err}"
        return out

    def enroll(self, user: str, keys: Path, *apps: str) -> Path:
        """Register a user with a fresh key (made in `keys`) owning these new apps; return
        the private key's path."""
        key = keygen(keys / f"{user}_id")
        self.ok("user", "add", user)
        self.ok("key", "add", user, "k", f"{key}.pub")
        for app in apps:
            self.ok("app", "create", app, "--owner", user)
        return key


REPO_ROOT = Path(__file__).resolve().parent.parent


_SANDBOX_ROOT: Path | None = None


def sandbox_root() -> Path:
    """A directory in the system temp dir (searchable by everyone, unlike pytest's) for
    what test gateways share with their deploy sandboxes: build directories and the
    exchange directory. Removed by the tests' conftest at the end of the session."""
    global _SANDBOX_ROOT
    if _SANDBOX_ROOT is None:
        import tempfile

        _SANDBOX_ROOT = Path(tempfile.mkdtemp(prefix="gateway-tests-"))
        _SANDBOX_ROOT.chmod(0o711)
    return _SANDBOX_ROOT


def exchange_dir() -> Path:
    """The directory test gateways' deploy sandboxes may write (FIFOs and dumps the deploy
    pipeline uses to talk to the test), apart from any gateway's state."""
    path = sandbox_root() / "exchange"
    path.mkdir(exist_ok=True)
    path.chmod(0o1777)  # the sandbox user (nobody under root) creates files here
    return path


def exchange_subdir(name: str) -> Path:
    """A fresh directory in the exchange directory, writable by the sandbox user."""
    path = exchange_dir() / unique(name)
    path.mkdir()
    path.chmod(0o777)
    return path


# Deploy commands in the tests run on the system's Python, which the sandbox sees under /usr
# (the test runner's own interpreter may live where the sandbox user cannot reach).
DEPLOY_PYTHON = "/usr/bin/python3"
PIPELINE = REPO_ROOT / "tests" / "e2e" / "deploy_pipeline.py"


def sandbox_settings(state: Path) -> dict[str, object]:
    """[deploy] settings that let a test's deploy command run in the real sandbox: the
    tests' pipeline script bound read-only, the exchange directory writable, builds beside
    the state, and an unprivileged user under root."""
    builds = sandbox_root() / unique("builds")
    settings: dict[str, object] = {
        "sandbox_read_paths": [str(PIPELINE.parent)],
        "sandbox_write_paths": [str(exchange_dir())],
        "build_dir": str(builds),
    }
    if os.geteuid() == 0:
        settings["sandbox_user"] = "nobody"
    return settings


def write_config(directory: Path, **overrides: dict[str, object]) -> Path:
    """A gateway config under `directory` on port 0; overrides are {section: {key: value}}.

    A deploy command runs in the real sandbox (see sandbox_settings) unless the test says
    otherwise."""
    sections: dict[str, dict[str, object]] = {
        # One process, as the in-process ServerThread; tests of `--workers` ask for more.
        # No balancer in front: SIGTERM closes the listener at once (tests of the accepting
        # period ask for one).
        "server": {"workers": 1, "drain_accept_seconds": 0},
        "ssh": {"listen": "127.0.0.1:0", "host_key_dir": str(directory / "hostkeys")},
        "storage": {
            "repos": str(directory / "repos"),
            "database": str(directory / "gw.db"),
            "control_socket": str(directory / "gw.sock"),
        },
        "deploy": {"log_dir": str(directory / "deploys"), "build_dir": str(directory / "builds")},
        "http": {"listen": "127.0.0.1:0"},
        # A killed gateway's deploys are declared interrupted this soon (15 s by default).
        "cluster": {"node_timeout": 4},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    if sections["deploy"].get("command"):
        require_sandbox()
        defaults = sandbox_settings(directory)
        sections["deploy"] = {**sections["deploy"], **defaults, **overrides.get("deploy", {})}
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            rendered = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
            lines.append(f"{key} = {rendered}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerThread:
    """A real Gateway on port 0, hosted by an event loop in a background thread, so that
    tests can call blocking git/ssh subprocesses without stalling the server."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = gwconfig.load(config_path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.gateway = Gateway(self.config)

    def call(self, coro: object, timeout: float = TIMEOUT) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def wait_until(self, predicate: object, timeout: float = TIMEOUT) -> None:
        """Block until predicate() is true, evaluated in the server's own loop between its
        callbacks (it sees the server's state as the server does)."""

        async def watch() -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while not predicate():  # type: ignore[operator]
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError("server condition not reached")
                await asyncio.sleep(0.01)

        self.call(watch(), timeout + 5)

    def start(self) -> ServerThread:
        self.thread.start()
        self.call(self.gateway.start())
        return self

    def stop(self) -> None:
        try:
            self.call(self.gateway.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def repos(self) -> Path:
        return self.config.storage.repos

    def repo(self, app: str) -> Path:
        return self.repos / f"{app}.git"

    def known_hosts(self, path: Path) -> Path:
        lines = []
        for pub in sorted(self.config.ssh.host_key_dir.glob("*.pub")):
            kind, data = pub.read_text().split()[:2]
            lines.append(f"[127.0.0.1]:{self.port} {kind} {data}")
        path.write_text("\n".join(lines) + "\n")
        return path


class GatewayHandle(ServerThread):
    """A started test gateway (see GatewayFactory) with what tests do to it: its operator
    CLI, users with fresh keys, apps."""

    def __init__(self, config_path: Path, home: Path) -> None:
        super().__init__(config_path)
        self.home = home
        self.admin = Admin(config_path)

    def user(
        self,
        prefix: str = "user",
        directory: Path | None = None,
        kind: str = "ed25519",
        bits: int | None = None,
    ) -> Client:
        """A new user with one fresh key (named laptop), and their client; keys and home
        in `directory` (the gateway's own directory by default)."""
        return registered_user(self, self.admin, directory or self.home, prefix, kind, bits)

    def app(self, owner: Client | str, prefix: str = "app", *options: str) -> str:
        """A new app owned by `owner`; options as `app create` takes them (--branch)."""
        name = unique(prefix)
        user = owner if isinstance(owner, str) else owner.name
        self.admin.ok("app", "create", name, "--owner", user, *options)
        return name


class GatewayFactory:
    """Starts test gateways, each in a fresh directory on port 0, and stops them all when
    closed (the fixtures close it at the end of their scope).

    `factory(toml, name=..., **sections)`: sections as write_config takes them
    ({section: {key: value}}), `toml` text appended to the file ([apps.NAME] tables).
    With `host_keys`, each gateway's host key directory starts as a copy of it (made once:
    an RSA key takes a while to generate), so its gateways share their host keys."""

    def __init__(self, mktemp: Any, host_keys: Path | None = None) -> None:
        self._mktemp = mktemp
        self._host_keys = host_keys
        self.started: list[GatewayHandle] = []

    def config(self, toml: str = "", *, name: str = "gw", **sections: dict[str, object]) -> Path:
        """Write a config file (in a fresh directory) without starting anything."""
        directory = self._mktemp(name)
        if self._host_keys is not None:
            shutil.copytree(self._host_keys, directory / "hostkeys")
        path = write_config(directory, **sections)
        if toml:
            path.write_text(path.read_text() + toml)
        return path

    def __call__(
        self, toml: str = "", *, name: str = "gw", **sections: dict[str, object]
    ) -> GatewayHandle:
        path = self.config(toml, name=name, **sections)
        handle = GatewayHandle(path, path.parent)
        try:
            handle.start()
        except BaseException:
            # Not started: only its loop's thread is left to end.
            handle.loop.call_soon_threadsafe(handle.loop.stop)
            raise
        self.started.append(handle)
        return handle

    def stop(self, handle: GatewayHandle) -> None:
        """Stop this gateway now (a test that must act after the stop), not again later."""
        self.started.remove(handle)
        handle.stop()

    def close(self) -> None:
        """Stop every gateway, the last started first; the first failure is raised after."""
        failure: BaseException | None = None
        while self.started:
            try:
                self.started.pop().stop()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


@dataclass
class Client:
    """One person at a terminal: their own HOME, key, known_hosts and git identity."""

    home: Path
    key: Path
    server: ServerThread
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        gitconfig = self.home / ".gitconfig"
        gitconfig.write_text(
            "[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n"
            "[protocol]\n\tversion = 2\n"
        )
        known_hosts = self.server.known_hosts(self.home / "known_hosts")
        self.ssh_base = [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "ConnectTimeout=20",
            "-p",
            str(self.server.port),
        ]
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": str(gitconfig),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "Test Author",
            "GIT_AUTHOR_EMAIL": "author@example.com",
            "GIT_COMMITTER_NAME": "Test Committer",
            "GIT_COMMITTER_EMAIL": "committer@example.com",
            "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
            "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
            "GIT_SSH_COMMAND": " ".join(self.ssh_base),
        }

    def url(self, app: str, form: str = "ssh") -> str:
        if form == "scp":
            return f"git@127.0.0.1:{app}.git"  # port comes from GIT_SSH_COMMAND
        return f"ssh://git@127.0.0.1:{self.server.port}/{app}.git"

    def git(
        self, *args: str, cwd: Path | None = None, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(["git", *args], env=self.env, cwd=cwd, check=check, input=input)

    def ssh(
        self, *args: str, input: str | bytes | None = None, options: tuple[str, ...] = ("-T",)
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [*self.ssh_base, *options, "git@127.0.0.1", *args], env=self.env, input=input or ""
        )

    def new_repo(
        self, path: Path, files: dict[str, str] | None = None, message: str = "first"
    ) -> Path:
        self.git("init", "-q", "-b", "main", str(path))
        self.commit(path, files or {"README": "hello\n"}, message)
        return path

    def commit(self, repo: Path, files: dict[str, str], message: str) -> str:
        for name, content in files.items():
            target = repo / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self.git("add", "-A", cwd=repo)
        self.git("commit", "-q", "-m", message, cwd=repo)
        return self.git("rev-parse", "HEAD", cwd=repo).stdout.strip()


def fsck(repo: Path) -> str:
    """Fail unless `git fsck` finds the server repository clean; return its output."""
    env = {
        "PATH": os.environ["PATH"],
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "HOME": str(repo),
    }
    result = run(["git", "fsck", "--full", "--no-dangling"], env=env, cwd=repo)
    assert result.returncode == 0, f"git fsck failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def server_refs(repo: Path) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    out = run(
        ["git", "for-each-ref", "--format=%(refname) %(objectname)"], env=env, cwd=repo, check=True
    )
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())  # type: ignore[misc]


def require_sandbox() -> None:
    """Deploy commands run in bubblewrap: without it (outside CI) the test is skipped."""
    if shutil.which("bwrap") is None and os.environ.get("GATEWAY_REQUIRE_TOOLS") != "1":
        import pytest

        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")


def require_tools() -> None:
    missing = [tool for tool in ("git", "ssh", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"tests need {', '.join(missing)} on PATH")


class LiveProcess:
    """A subprocess whose output lines are read by threads as they come, so that a test can
    wait for one line (an event, never a sleep) and act while the process still runs."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        umask: int = -1,
        new_session: bool = False,
        credentials: dict[str, Any] | None = None,
    ):
        import queue

        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            umask=umask,
            start_new_session=new_session,
            **(credentials or {}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.lines: list[str] = []  # stderr lines consumed so far
        self.stdout: list[str] = []
        self._stdout_changed = threading.Condition()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._stdout_changed:
                self.stdout.append(line)
                self._stdout_changed.notify_all()
        with self._stdout_changed:
            self.stdout_closed = True
            self._stdout_changed.notify_all()

    stdout_closed = False

    def wait_for_stdout(self, pattern: str):  # type: ignore[no-untyped-def]
        """Block until a stdout line matches; fail if the output ends first."""
        import re

        def found():  # type: ignore[no-untyped-def]
            return next((m for line in self.stdout if (m := re.search(pattern, line))), None)

        with self._stdout_changed:
            ok = self._stdout_changed.wait_for(
                lambda: found() is not None or self.stdout_closed, TIMEOUT
            )
            match = found()
        if not ok or match is None:
            raise AssertionError(f"no stdout line matches {pattern!r}:\n{''.join(self.stdout)}")
        return match

    def wait_for(self, pattern: str, timeout: float = TIMEOUT):  # type: ignore[no-untyped-def]
        """Block until a stderr line matches (each line within `timeout`); fail if the
        process ends first."""
        import re

        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"process ended before {pattern!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Wait for the exit and collect the rest of the output."""
        code = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        for reader in self._readers:
            reader.join(timeout)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(TIMEOUT)


def raw(server: ServerThread, source: str = "127.0.0.1") -> socket.socket:
    """A bare TCP connection to the gateway that says nothing (a slowloris client)."""
    return socket.create_connection(
        ("127.0.0.1", server.port), timeout=TIMEOUT, source_address=(source, 0)
    )


def banner(sock: socket.socket) -> bytes:
    """What the server sends first: its SSH banner, or b"" if it closed the connection."""
    return sock.recv(256)


def settle(server: ServerThread) -> None:
    """Wait until the server has released every connection."""
    server.wait_until(lambda: server.gateway.admission.total == 0)


class ServeProcess(LiveProcess):
    """The gateway as operators run it (`python -m gateway serve`), in its own process, with
    what Client needs of a server: its port, its config and its host keys."""

    def __init__(
        self,
        config_path: Path,
        umask: int = -1,
        args: tuple[str, ...] = (),
        command: tuple[str, ...] = (sys.executable, "-m", "gateway"),
        cwd: Path | None = None,
    ) -> None:
        super().__init__(
            [*command, "--config", str(config_path), "serve", *args], umask=umask, cwd=cwd
        )
        self.config_path = config_path
        self.config = gwconfig.load(config_path)
        # With workers, the supervisor says it once all of them serve.
        self.port = int(self.wait_for(r"event=listening address=127\.0\.0\.1:(\d+)").group(1))

    known_hosts = ServerThread.known_hosts

    def stop(self) -> int:
        """SIGTERM, then the exit code once the log is read to its end."""
        import signal

        self.proc.send_signal(signal.SIGTERM)
        return self.finish()


def ssh_connect(port: int, *keys: object, **options: object):  # type: ignore[no-untyped-def]
    """An asyncssh client connection to a test gateway as user git, with exactly these keys
    (a path, or an asyncssh key or key pair) and no agent; host keys are not checked."""
    import asyncssh

    loaded = [asyncssh.read_private_key(k) if isinstance(k, Path) else k for k in keys]
    settings: dict[str, object] = {
        "username": "git",
        "client_keys": loaded or None,
        "known_hosts": None,
        "agent_path": None,
    }
    settings.update(options)
    return asyncssh.connect("127.0.0.1", port, **settings)


def http_base(server: ServerThread) -> str:
    """The base URL of a test gateway's HTTP listener."""
    address = server.gateway.deploys.http_address
    assert address is not None, "the gateway's HTTP listener is off"
    return f"http://{address[0]}:{address[1]}"


@dataclass
class HTTPReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def http(
    method: str,
    url: str,
    token: str | None = None,
    body: object = None,
    raw: bytes | None = None,
) -> HTTPReply:
    """One HTTP request (urllib, blocking: the server runs in its own thread or process)."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            return HTTPReply(reply.status, dict(reply.headers), reply.read())
    except urllib.error.HTTPError as err:
        return HTTPReply(err.code, dict(err.headers), err.read())


def race_one_round(pushers: list[tuple[Client, Path]], app: str, round_number: int) -> str:
    """Each pusher commits on top of the branch as it is now, then all push `main` at once:
    exactly one must win, and every other one be cleanly rejected. Returns the winner's
    commit (what the branch must now hold)."""
    commits = []
    for index, (client, copy) in enumerate(pushers):
        client.git("fetch", "-q", client.url(app), "main", cwd=copy)
        client.git("reset", "-q", "--hard", "FETCH_HEAD", cwd=copy)
        commits.append(client.commit(copy, {f"r{round_number}-{index}": "x\n"}, f"{index}"))
    racing = [
        subprocess.Popen(
            ["git", "push", client.url(app), "main"],
            cwd=copy,
            env=client.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for client, copy in pushers
    ]
    outcomes = []
    for proc in racing:
        _, err = proc.communicate(timeout=TIMEOUT)
        outcomes.append((proc.returncode, err.decode()))
    winners = [i for i, (code, _) in enumerate(outcomes) if code == 0]
    assert len(winners) == 1, outcomes  # exactly one per round...
    for code, err in outcomes:
        if code != 0:  # ...and every other one is cleanly rejected
            assert "rejected" in err or "failed to update ref" in err or "cannot lock" in err
    return commits[winners[0]]


def registered_user(
    server: ServerThread,
    admin: Admin,
    directory: Path,
    prefix: str = "user",
    kind: str = "ed25519",
    bits: int | None = None,
) -> Client:
    """A new user with one fresh key (named laptop) on `server`, and their client."""
    name = unique(prefix)
    key = keygen(directory / f"{name}_id", kind, bits)
    admin.ok("user", "add", name)
    admin.ok("key", "add", name, "laptop", f"{key}.pub")
    return Client(directory / f"home-{name}", key, server, name=name)
