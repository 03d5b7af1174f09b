"""The deploy sandbox: every deploy command runs in bubblewrap, as an unprivileged user.

What a sandboxed process sees (and nothing else): a read-only `/usr` (with the `/bin`, `/lib`
links or directories of the host), an allow-listed read-only `/etc` with its own `passwd` and
`group`, a fresh `/dev` and a `/proc` of its own PID namespace, a private size-limited `/tmp`,
the export directory at `/app` (its only writable place with `/tmp`), and the operator's extra
read-only and writable paths. It has its own mount, PID, IPC, UTS, cgroup and user namespaces
(no nested ones), no capabilities, no io_uring (seccomp.py), a new session (no terminal to
inject keys into), the network its [deploy] network gives (gateway/deploys/network.py), and
resource limits (prlimit) on every process.

bwrap mounts its sources by path as the sandbox user: that user must be able to reach them
(every parent directory searchable). The gateway grants search, never read, on the directories
of its own on the way to `[deploy] build_dir` and names any other in the way at start (a
private `var/` made by its first start is the usual one). The export directory lives
in `[deploy] build_dir`, which only the gateway can write, so no tenant can swap it for a link.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
import os
import pwd
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, DeploySettings
from ..logs import q
from . import builddir, seccomp
from . import network as net
from .builddir import RunAs, SandboxError
from .confine import Confinement

log = logging.getLogger("gateway.deploys")

# Where the export directory appears inside the sandbox (the command's working directory).
APP_DIR = "/app"
SANDBOX_PATH = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin"
HOSTNAME = "deploy"

# Top-level entries that are symlinks into /usr on merged-/usr systems and directories on
# older ones: reproduced as they are on the host.
ROOT_ENTRIES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

# The part of the host's /etc a build needs (TLS roots, name resolution, the dynamic loader,
# time zones, interpreters' own config, Debian's alternatives). Allow-listed: nothing else of
# /etc (shadow, ssh host keys, the gateway's config...) is ever visible.
ETC_ALLOWED = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "ssl",
    "pki",
    "crypto-policies",
    "resolv.conf",
    "hosts",
    "host.conf",
    "nsswitch.conf",
    "gai.conf",
    "services",
    "protocols",
    "networks",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "mime.types",
    "magic",
    "magic.mime",
    "os-release",
    "debian_version",
    "xml",
    "python3*",
    "perl",
    "java-*",
)

BWRAP_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"
USERNS_HINT = (
    "bubblewrap needs unprivileged user namespaces: check `sysctl user.max_user_namespaces` "
    "(> 0), `kernel.unprivileged_userns_clone` (1) or AppArmor's "
    "`kernel.apparmor_restrict_unprivileged_userns` (0), and that the service manager allows "
    "them (systemd: RestrictNamespaces must allow user, mnt, pid, ipc, uts, net, cgroup; "
    "in a container: the runtime flags in docs/container.md)"
)
# In a container, user namespaces usually work but the runtime's defaults stop bwrap: the
# seccomp profile refuses sethostname (podman) or unshare (docker), and the masked paths over
# /proc forbid mounting a new /proc. These flags lift exactly that (docs/container.md). Told
# on bwrap's own words: a file such as /.dockerenv also exists on hosts built from images.
CONTAINER_ERRORS = ("Can't set hostname", "Can't mount proc")
CONTAINER_HINT = (
    "in a container, run it with `--security-opt seccomp=unconfined --security-opt "
    "unmask=/proc/*` (podman; docker: `--security-opt seccomp=unconfined --security-opt "
    "systempaths=unconfined --security-opt apparmor=unconfined`), see docs/container.md"
)
NONE_HINT = 'or set [deploy] sandbox = "none" (single-tenant installations only)'


@dataclass(frozen=True)
class Limits:
    """Resource limits applied with prlimit to every process of a deploy."""

    cpu_seconds: int
    memory: int
    processes: int
    file_size: int
    open_files: int
    tmp_size: int
    build_size: int = 4 << 30  # watched (buildsize.py), not a prlimit

    @classmethod
    def of(cls, settings: DeploySettings) -> Limits:
        return cls(
            cpu_seconds=settings.max_cpu_seconds,
            memory=settings.max_memory,
            processes=settings.max_processes,
            file_size=settings.max_file_size,
            open_files=settings.max_open_files,
            tmp_size=settings.max_tmp_size,
            build_size=settings.max_build_size,
        )

    def prlimit_args(self) -> list[str]:
        # RLIMIT_DATA rather than RLIMIT_AS: runtimes that reserve large address ranges
        # without using them (V8, Go, the JVM) would not even start under an AS limit.
        return [
            f"--cpu={self.cpu_seconds}",
            f"--data={self.memory}",
            f"--nproc={self.processes}",
            f"--fsize={self.file_size}",
            f"--nofile={self.open_files}",
            "--core=0",
        ]


@dataclass(frozen=True)
class Sandbox:
    """One deploy's sandbox, resolved from its (per-app) settings."""

    kind: str  # "bubblewrap" or "none"
    read_paths: tuple[Path, ...]
    write_paths: tuple[Path, ...]
    network: net.Network
    run_as: RunAs | None  # None: the gateway's own user
    limits: Limits
    bwrap: str
    prlimit: str

    @property
    def enabled(self) -> bool:
        return self.kind == "bubblewrap"

    @property
    def uid(self) -> int:
        return self.run_as.uid if self.run_as is not None else os.geteuid()

    @property
    def gid(self) -> int:
        return self.run_as.gid if self.run_as is not None else os.getegid()

    @classmethod
    def of(cls, settings: DeploySettings) -> Sandbox:
        """Resolve the settings; SandboxError with what to fix if they cannot work here."""
        if settings.sandbox == "none":
            return cls("none", (), (), net.Network("host"), None, Limits.of(settings), "", "")
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SandboxError(f"deploy sandbox: bwrap not found: {BWRAP_HINT}, {NONE_HINT}")
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise SandboxError(
                "deploy sandbox: prlimit not found: install util-linux "
                "(Debian/Ubuntu: apt-get install util-linux)"
            )
        try:
            network = net.Network.of(settings.network)
        except net.NetworkError as exc:
            raise SandboxError(f"deploy sandbox: {exc}") from None
        return cls(
            "bubblewrap",
            settings.sandbox_read_paths,
            settings.sandbox_write_paths,
            network,
            _run_as(settings.sandbox_user),
            Limits.of(settings),
            bwrap,
            prlimit,
        )

    # -- running a command inside --

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        export_dir: Path,
        env: Mapping[str, str],
        network: str | None = None,
        confinement: Confinement | None = None,
        **streams: Any,
    ) -> asyncio.subprocess.Process:
        """Start argv inside the sandbox with `export_dir` at /app (its working directory).

        The process leads its own process group (kill the group to stop the sandbox); with
        `--die-with-parent` the sandbox also dies if the gateway does. A `confinement`
        (confine.py) watches it and, where cgroup v2 is delegated, starts it in its cgroup.
        """
        if not self.enabled:
            raise RuntimeError("spawn() needs the bubblewrap sandbox")
        binds = _Binds()
        network_of = self.network.but(network)
        handshake = net.Handshake() if network_of.mode == "isolated" else None
        try:
            args = self._bwrap_args(binds, export_dir, network_of, handshake)
            full = [
                self.prlimit,
                *self.limits.prlimit_args(),
                "--",
                self.bwrap,
                *args,
                "--",
                *argv,
            ]
            # Dropped in the child before exec (no preexec hook): prlimit and bwrap already run
            # as the unprivileged user, with no supplementary groups.
            user = self.run_as.uid if self.run_as is not None else None
            group = self.run_as.gid if self.run_as is not None else None
            extra_groups: list[int] | None = [] if self.run_as is not None else None
            launch = confinement.launch(full) if confinement else None
            try:
                proc = await asyncio.create_subprocess_exec(
                    *(launch.argv if launch else full),
                    env={**env, "PATH": env.get("PATH", SANDBOX_PATH)},
                    pass_fds=[*binds.fds, *(handshake.child_fds() if handshake else [])],
                    # A new session (no terminal to inject into) for the whole sandbox, made
                    # here rather than by bubblewrap's --new-session: its setsid took the
                    # sandbox's first process out of this process group, and a kill of the
                    # group in the instant before bubblewrap armed its parent-death signal
                    # left the deploy running, unparented.
                    start_new_session=True,
                    user=user,
                    group=group,
                    extra_groups=extra_groups,
                    **streams,
                )
            except BaseException:
                if launch:
                    launch.open()
                if handshake:
                    handshake.close()
                raise
        finally:
            binds.close()
            if handshake:
                handshake.spawned()
        try:
            if confinement and launch:
                await confinement.started(proc, launch)
            if handshake:
                await self._attach_network(proc, network_of, handshake)
        except BaseException:
            # Nothing of the deploy has run yet: bubblewrap waits on the handshake.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            raise
        finally:
            if handshake:
                handshake.close()
        return proc

    async def _attach_network(
        self, proc: asyncio.subprocess.Process, network: net.Network, handshake: net.Handshake
    ) -> None:
        """pasta joins the sandbox's network namespace, then the command may start."""
        try:
            pid = await handshake.child_pid()
        except TimeoutError:
            raise SandboxError("deploy sandbox: bubblewrap did not start in time") from None
        if pid is None:
            return  # bubblewrap failed before its namespaces: its reason is on its stderr
        privileges: dict[str, Any] = {}
        if self.run_as is not None:
            privileges = {"user": self.run_as.uid, "group": self.run_as.gid, "extra_groups": []}
        try:
            pasta = await network.attach(pid, privileges)
        except net.NetworkError as exc:
            # bubblewrap sets up its mounts while pasta joins: if it failed there (a path
            # the sandbox user cannot reach...), its own words on its stderr say more.
            # Healthy, it waits on the handshake and never exits here.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), 2)
                return
            raise SandboxError(f"deploy sandbox cannot be built: {exc}") from None
        try:
            handshake.release()
        except BaseException:
            await net.stop(pasta)
            raise
        task = asyncio.create_task(_stop_after(proc, pasta))
        _PASTAS[proc.pid] = task
        task.add_done_callback(functools.partial(_forget_pasta, proc.pid))

    def _bwrap_args(
        self,
        binds: _Binds,
        export_dir: Path,
        network: net.Network,
        handshake: net.Handshake | None = None,
    ) -> list[str]:
        args = [
            "--unshare-user",
            "--unshare-all",
            *network.bwrap_args(handshake),
            "--disable-userns",
            "--die-with-parent",
            "--cap-drop",
            "ALL",
            "--hostname",
            HOSTNAME,
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for name in ROOT_ENTRIES:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        args += ["--dir", "/etc"]
        for entry in _etc_entries():
            args += ["--ro-bind", str(entry), str(entry)]
        args += ["--ro-bind-data", binds.data(self._passwd()), "/etc/passwd"]
        args += ["--ro-bind-data", binds.data(self._group()), "/etc/group"]
        if (resolv_conf := network.resolv_conf()) is not None:
            args += ["--ro-bind-data", binds.data(resolv_conf), "/etc/resolv.conf"]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(self.limits.tmp_size),
            "--tmpfs",
            "/tmp",  # noqa: S108 - the sandbox's own private /tmp
            "--size",
            str(min(self.limits.tmp_size, 64 * 1024 * 1024)),
            "--tmpfs",
            "/dev/shm",  # noqa: S108 - inside the sandbox
            "--dir",
            "/var",
            "--symlink",
            "../tmp",
            "/var/tmp",  # noqa: S108 - inside the sandbox
            "--size",
            str(1024 * 1024),
            "--tmpfs",
            "/run",
        ]
        for path in self.read_paths:
            if path.exists():
                args += ["--ro-bind", str(path), str(path)]
        for path in self.write_paths:
            if path.exists():
                args += ["--bind", str(path), str(path)]
        args += ["--bind", str(export_dir), APP_DIR, "--chdir", APP_DIR]
        # io_uring refused: files registered with a ring hide from the build-size watcher.
        args += ["--seccomp", binds.data(seccomp.program())]
        # bwrap builds / and /dev on unbounded in-memory filesystems: once everything is
        # mounted, make them read-only, so that writes can only go to the bounded /tmp,
        # /dev/shm and /run, the export and the operator's writable paths.
        args += ["--remount-ro", "/dev", "--remount-ro", "/"]
        return args

    def _passwd(self) -> bytes:
        return (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"deploy:x:{self.uid}:{self.gid}:deploy:{APP_DIR}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode()

    def _group(self) -> bytes:
        return f"root:x:0:\ndeploy:x:{self.gid}:\nnogroup:x:65534:\n".encode()

    def prepare_build_dir(self, build_dir: Path) -> list[Path]:
        """Create the build directory and let this sandbox's user walk to it (see
        builddir.prepare); the directories opened up for it are returned."""
        return builddir.prepare(build_dir, self.run_as)

    def prepare_dir(self, path: Path) -> None:
        """Give an export directory to the sandbox user (blocking; run off the loop)."""
        builddir.give(path, self.run_as)


# Tasks that stop each isolated sandbox's pasta once the sandbox has ended, by the PID of
# the sandbox's first process (kept referenced until done).
_PASTAS: dict[int, asyncio.Task[None]] = {}


def _forget_pasta(pid: int, done: asyncio.Task[None]) -> None:
    if _PASTAS.get(pid) is done:  # not a later sandbox's that got the same PID
        del _PASTAS[pid]


async def network_stopped(proc: asyncio.subprocess.Process) -> None:
    """Once `proc` (a sandbox) has ended: wait until its pasta, if any, is gone and reaped,
    so that nothing of the sandbox outlives the caller's work (or its event loop)."""
    task = _PASTAS.get(proc.pid)
    if task is not None:
        await asyncio.shield(task)


async def _stop_after(proc: asyncio.subprocess.Process, pasta: asyncio.subprocess.Process) -> None:
    try:
        await proc.wait()
    finally:
        await net.stop(pasta)


class _Binds:
    """File descriptors handed to bwrap for one spawn; closed in the gateway once spawned."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def data(self, content: bytes) -> str:
        """A pipe holding `content` (small: it must fit the pipe buffer), read by bwrap."""
        read, write = os.pipe()
        try:
            os.write(write, content)
        finally:
            os.close(write)
        self.fds.append(read)
        return str(read)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def _etc_entries() -> list[Path]:
    try:
        names = sorted(os.listdir("/etc"))
    except OSError:
        return []
    return [
        Path("/etc") / name
        for name in names
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in ETC_ALLOWED)
        and os.path.exists(Path("/etc") / name)  # a dangling link binds nothing
    ]


def _run_as(user: str) -> RunAs | None:
    """The account to drop to: required (and not root) when the gateway runs as root."""
    if os.geteuid() != 0:
        if user and _lookup(user).pw_uid != os.geteuid():
            raise SandboxError(
                f"[deploy] sandbox_user = '{user}': the gateway does not run as root, so deploys "
                "run as its own user; remove sandbox_user or start the gateway as root"
            )
        return None
    if not user:
        raise SandboxError(
            "deploy sandbox: the gateway runs as root: set [deploy] sandbox_user to an "
            "unprivileged user for deploy commands (e.g. a dedicated `useradd --system "
            "gateway-deploy`, or one per app in [apps.NAME])"
        )
    entry = _lookup(user)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise SandboxError(f"[deploy] sandbox_user = '{user}' must not be root")
    return RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _lookup(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise SandboxError(f"[deploy] sandbox_user: no such user '{user}'") from None


def sandboxes(cfg: Config) -> dict[str, Sandbox]:
    """Every distinct sandbox the configuration asks for, by label ("[deploy]" or
    "[apps.NAME]"), for the command pipelines only (a webhook runs no code here)."""
    found: dict[str, Sandbox] = {}
    labelled = [("[deploy]", cfg.deploy)]
    labelled += [(f"[apps.{app}]", cfg.deploy_for(app)) for app in cfg.apps]
    for label, settings in labelled:
        if not settings.command:
            continue
        try:
            found[label] = Sandbox.of(settings)
        except SandboxError as exc:
            raise SandboxError(f"{label}: {exc}") from None
    return found


async def probe(sandbox: Sandbox, build_dir: Path) -> None:
    """Start a real sandbox once and run `true` in it; SandboxError with bwrap's reason."""
    if not sandbox.enabled:
        return
    for directory in await asyncio.to_thread(sandbox.prepare_build_dir, build_dir):
        log.info(
            "event=build_dir_searchable path=%s user=%s reason=%s",
            q(str(directory)),
            q(sandbox.run_as.name if sandbox.run_as else ""),
            q("the sandbox user must reach [deploy] build_dir; it can search, never list"),
        )
    export = await asyncio.to_thread(_make_probe_dir, build_dir, sandbox)
    try:
        proc = await sandbox.spawn(
            ["true"],
            export_dir=export,
            env={"PATH": SANDBOX_PATH},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            raise SandboxError("deploy sandbox: a test sandbox did not start in 30 s") from None
        finally:
            await network_stopped(proc)
    finally:
        await asyncio.to_thread(builddir.remove_tree, export)
    if proc.returncode != 0:
        reason = net.reason_lines((err or b"").decode("utf-8", "replace"))
        line = reason[-1] if reason else f"exit code {proc.returncode}"
        if "Permission denied" in line and "source path" in line:
            hint = (
                f"the sandbox user (uid {sandbox.uid}) must be able to reach [deploy] build_dir "
                f"({build_dir}) and every extra path: make their parent directories searchable"
            )
        elif any(error in line for error in CONTAINER_ERRORS):
            hint = CONTAINER_HINT
        else:
            hint = USERNS_HINT
        raise SandboxError(f"deploy sandbox cannot be built: {line}: {hint}, {NONE_HINT}")


def _make_probe_dir(build_dir: Path, sandbox: Sandbox) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="probe-", dir=build_dir))
    sandbox.prepare_dir(path)
    return path


async def check(cfg: Config) -> list[str]:
    """Prove that every configured command pipeline can get its sandbox, by building each
    once; SandboxError on the first that cannot. Returns warnings: unsandboxed pipelines,
    and writable paths every app's deploys share (one tenant's build could poison
    another's)."""
    warnings = []
    shared = [str(p) for p in cfg.deploy.sandbox_write_paths]
    if shared and any(box.enabled for box in sandboxes(cfg).values()):
        warnings.append(
            f"[deploy] sandbox_write_paths ({', '.join(shared)}) is writable by every app's "
            "deploys: what one tenant writes there, another's build reads; give each app its "
            "own in [apps.NAME] where tenants do not trust each other"
        )
    boxes = sandboxes(cfg)
    refused = net.refusal(cfg, {label: box.network.mode for label, box in boxes.items()})
    if refused:
        raise SandboxError(refused)
    for label, sandbox in boxes.items():
        if sandbox.enabled and sandbox.network.mode == "host":
            warnings.append(net.host_warning(label))
        if not sandbox.enabled:
            warnings.append(
                f'{label} sandbox = "none": deploy commands run as the gateway itself and can '
                "read and change everything it can (registry, host keys, every repository): "
                "single-tenant installations only"
            )
            continue
        if cfg.deploy.build_dir is None:  # pragma: no cover - config.load resolves it
            raise SandboxError("[deploy] build_dir is not set")
        try:
            await probe(sandbox, cfg.deploy.build_dir)
        except SandboxError as exc:
            raise SandboxError(f"{label}: {exc}") from None
    return warnings
