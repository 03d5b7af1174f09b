"""Benchmark: the gateway against its peers and the file:// floor, in the same run.

    python -m bench [--quick | --profile tiny|small|large] [--repo PATH] [--json FILE]
                    [--markdown FILE] [--cipher NAME] [--database sqlite|postgresql|both]
                    [--keys N] [--no-pack-cache]
    python -m bench --workers N [--quick | --profile ...] [--reps N] [--json FILE]
    python -m bench --cluster [--profile ...] [--reps N] [--node-timeout S] [--cipher NAME]
                    [--json FILE]

Every workload runs against every target (file://, OpenSSH + git, OpenSSH + git pinned to
AES-GCM, gitolite3 when it can run here, the gateway), alternating their order at each
repetition, and reports min / median / max and the ratio of the gateway to each (lower is
better). The targets serve the same bare repository (gitolite3 a copy of it, under its own
user), with the same git settings. The cipher, MAC and key exchange each SSH target
negotiated are reported with the figures; --markdown also writes a PNG plot of the ratios.
The gateway's registry is SQLite, or a PostgreSQL server the benchmark starts; with both,
the auth-cost workload runs on each, side by side (the others on SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.git.repos import git_settings

from . import gitolite, plot, registry, repogen
from .gitolite import Gitolite
from .postgres import INSTALL_HINT, PostgresServer, binaries
from .servers import TIMEOUT, Gateway, PrivateSSHD, cpu_seconds, rss_kib, run

# Every target the benchmark knows, in table order; a run uses those that can run here.
TARGETS = ("file", "openssh", "openssh_gcm", "gitolite", "gateway")
LABELS = {
    "file": "file://",
    "openssh": "OpenSSH + git",
    "openssh_gcm": "OpenSSH AES-GCM",
    "gitolite": "gitolite3",
    "gateway": "gateway",
}
GCM = "aes128-gcm@openssh.com"  # the OpenSSH reference pinned cipher for cipher
DATABASES = ("sqlite", "postgresql")
FEW_KEYS = 10  # keys registered on the "few keys" side of the auth-cost workload
LIMITS = (
    "[limits]\nmax_connections = 5000\nmax_connections_per_address = 5000\n"
    "max_unauthenticated = 500\nuser_ops_per_minute = 100000\n"
    "max_connections_per_user = 5000\nmax_fetches_per_user = 5000\nmax_pushes_per_user = 5000\n"
)


@dataclass
class Settings:
    profile: str
    reps: int
    keys: int  # keys registered for the auth-cost workload
    idle_connections: int
    sequential: int  # ls-remote connections in a row
    concurrency: tuple[int, ...]
    concurrent_reps: int = 1
    storm: int = 32  # concurrent fetches in a fetch storm


MODES = {
    "tiny": Settings(
        "tiny",
        reps=1,
        keys=1_000,
        idle_connections=20,
        sequential=5,
        concurrency=(2, 4),
        storm=4,
    ),
    "quick": Settings(
        "small", reps=3, keys=10_000, idle_connections=200, sequential=50, concurrency=(8, 32)
    ),
    "full": Settings(
        "large",
        reps=5,
        keys=100_000,
        idle_connections=200,
        sequential=50,
        concurrency=(8, 32),
        concurrent_reps=3,
    ),
}


@dataclass
class Target:
    name: str
    repo_url: Callable[[str], str]  # repository name -> URL
    repo_path: Callable[[str], Path]  # repository name -> path on the server
    upload_pack: Callable[[str], list[str]]  # repository name -> argv serving upload-pack
    ssh: list[str] | None = None  # the ssh command git runs for this target


@dataclass
class Figures:
    """Measurements of one workload: per target, a list of values (seconds unless said)."""

    targets: list[str]
    values: dict[str, list[float]] = field(init=False)
    extra: dict[str, object] = field(default_factory=dict)
    gateway_cpu_s: float = 0.0

    def __post_init__(self) -> None:
        self.values = {t: [] for t in self.targets}

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for target, values in self.values.items():
            if values:
                out[target] = {
                    "min": round(min(values), 4),
                    "median": round(statistics.median(values), 4),
                    "max": round(max(values), 4),
                    "n": len(values),
                }
        out.update(ratios({t: statistics.median(v) for t, v in self.values.items() if v}))
        out.update(self.extra)
        out["gateway_cpu_s"] = round(self.gateway_cpu_s, 3)
        return out


def ratios(central: dict[str, float]) -> dict[str, float]:
    """gateway / each other target, from one central value (median, p50) per target."""
    if "gateway" not in central:
        return {}
    return {
        f"gateway/{target}": round(central["gateway"] / value, 3)
        for target, value in central.items()
        if target != "gateway" and value
    }


def pkt(text: str) -> bytes:
    data = text.encode()
    return f"{len(data) + 4:04x}".encode() + data


class Bench:
    def __init__(
        self,
        settings: Settings,
        root: Path,
        repo: Path | None,
        cipher: str | None = None,
        databases: tuple[str, ...] = ("sqlite",),
        pack_cache: bool = True,
    ) -> None:
        self.s = settings
        self.root = root
        self.source_repo = repo
        self.cipher = cipher  # pin the SSH clients to this cipher (ssh -c), else their default
        # The registries the gateway runs on; every workload uses the first, auth_cost all.
        self.databases = databases
        self.gateways: dict[str, Gateway] = {}
        self.postgres: PostgresServer | None = None
        self.postgres_info: dict[str, object] | None = None
        self.pack_cache = pack_cache
        self.sshd: PrivateSSHD | None = None
        self.gitolite: Gitolite | None = None
        self.names: list[str] = [t for t in TARGETS if t != "gitolite"]  # those that run
        self.skipped: dict[str, str] = {}  # target -> why it did not run
        self.negotiated: dict[str, dict[str, str] | None] = {t: None for t in TARGETS}
        self.results: dict[str, dict[str, object]] = {}
        self.user = getpass.getuser()

    # -- setup --

    def setup(self) -> None:
        root = self.root
        self.key = root / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)])
        pubkey = Path(f"{self.key}.pub").read_text()

        if "postgresql" in self.databases:
            bin_dir = binaries()
            if bin_dir is None:
                raise SystemExit(f"--database postgresql: {INSTALL_HINT}")
            # PostgreSQL's own defaults (fsync, synchronous commit): an operator's server.
            self.postgres = PostgresServer(
                bin_dir, durable=True, password=secrets.token_urlsafe(24)
            ).start()
            self.postgres_info = {
                "version": self.postgres.version(),
                "port": self.postgres.port,
                "settings": "defaults (fsync on, synchronous_commit on)",
            }
        for backend in self.databases:
            main = backend == self.databases[0]
            gateway = Gateway(
                root / ("gateway" if main else f"gateway-{backend}"),
                LIMITS + ("" if self.pack_cache else "[git]\npack_cache = false\n"),
                self.postgres.create_database("bench") if backend == "postgresql" else None,
            )
            self.gateways[backend] = gateway
            gateway.cli("user", "add", "bench")
            gateway.cli("key", "add", "bench", "k", "-", stdin=pubkey)
            gateway.cli("app", "create", "bench", "--owner", "bench")
        self.gateway = self.gateways[self.databases[0]]
        self.repo = self.gateway.repos / "bench.git"
        generated = self.source_repo or root / "generated.git"
        if self.source_repo is None:
            repogen.generate(generated, repogen.PROFILES[self.s.profile])
        git = self.git_env()
        run(["git", "fetch", "-q", str(generated), "+refs/heads/*:refs/heads/*"], git, self.repo)
        run(["git", "repack", "-adq"], git, self.repo)
        self.head = run(["git", "rev-parse", "main"], git, self.repo).strip()
        run(["git", "update-ref", "refs/heads/bench-base", "main~10"], git, self.repo)
        self.pack_bytes = repogen.pack_size(self.repo)
        for gateway in self.gateways.values():
            if gateway is not self.gateway:
                # The same refs: ls-remote advertises them all, so it costs the same.
                run(
                    ["git", "fetch", "-q", str(self.repo), "+refs/*:refs/*"],
                    git,
                    gateway.repos / "bench.git",
                )

        self.sshd = PrivateSSHD(root / "sshd", pubkey)
        self.setup_gitolite(pubkey)
        for gateway in self.gateways.values():
            gateway.start()
        self.sshd.start()
        known = root / "known_hosts"
        known.write_text(
            "".join(
                f"[127.0.0.1]:{gateway.port} {k}\n"
                for gateway in self.gateways.values()
                for k in gateway.host_keys()
            )
            + "".join(f"[127.0.0.1]:{self.sshd.port} {k}\n" for k in self.sshd.host_keys())
        )
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
            f"UserKnownHostsFile={known}",
        ]
        ssh_gcm = [*self.ssh_base, "-c", GCM]
        if self.cipher:
            self.ssh_base += ["-c", self.cipher]
        # Repositories that OpenSSH and file:// push into live beside, with the gateway's
        # git settings, so that the comparison is about transport, not configuration.
        self.plain_root = root / "plain"
        self.plain_root.mkdir()
        gw_repos = self.gateway.repos

        def plain(name: str) -> Path:
            return gw_repos / f"{name}.git" if name == "bench" else self.plain_root / f"{name}.git"

        ssh_upload = ["-p", str(self.sshd.port), f"{self.user}@127.0.0.1"]
        self.gateway_targets = {b: self.gateway_target(g) for b, g in self.gateways.items()}
        sshd_url = f"ssh://{self.user}@127.0.0.1:{self.sshd.port}"
        self.targets = {
            "file": Target(
                "file",
                lambda n: f"file://{plain(n)}",
                plain,
                lambda n: ["git", "upload-pack", str(plain(n))],
            ),
            "openssh": Target(
                "openssh",
                lambda n: f"{sshd_url}{plain(n)}",
                plain,
                lambda n: [*self.ssh_base, *ssh_upload, f"git-upload-pack '{plain(n)}'"],
            ),
            # The same sshd and repositories, the client pinned to AES-GCM: what OpenSSH
            # costs cipher for cipher when the gateway negotiates AES-GCM.
            "openssh_gcm": Target(
                "openssh_gcm",
                lambda n: f"{sshd_url}{plain(n)}",
                plain,
                lambda n: [*ssh_gcm, *ssh_upload, f"git-upload-pack '{plain(n)}'"],
                ssh_gcm,
            ),
            "gateway": self.gateway_targets[self.databases[0]],
        }
        if self.gitolite is not None:
            gitolite_login = ["-p", str(self.sshd.port), f"{gitolite.USER}@127.0.0.1"]
            self.targets["gitolite"] = Target(
                "gitolite",
                lambda n: f"ssh://{gitolite.USER}@127.0.0.1:{self.sshd.port}/{n}.git",
                lambda n: gitolite.HOME / "repositories" / f"{n}.git",
                lambda n: [*self.ssh_base, *gitolite_login, f"git-upload-pack '{n}.git'"],
            )
        self.names = [t for t in TARGETS if t in self.targets]
        self.work = root / "work"
        self.work.mkdir()

    def setup_gitolite(self, pubkey: str) -> None:
        """gitolite3 behind the private sshd, or one line saying why it is skipped."""
        reason = gitolite.unavailable()
        peer = gitolite.Gitolite()
        if reason is None:
            reason = peer.acquire()
        if reason is not None:
            self.skipped["gitolite"] = reason
            print(f"gitolite3: skipped, {reason}", file=sys.stderr, flush=True)
            return
        self.gitolite = peer
        reps = max(self.s.reps, 1)
        peer.setup(pubkey, self.repo, [f"push-gitolite-{rep}" for rep in range(reps)])
        assert self.sshd is not None  # noqa: S101 - created just before
        self.sshd.user_keys[gitolite.USER] = peer.authorized_keys()

    def gateway_target(self, gateway: Gateway) -> Target:
        upload = [*self.ssh_base, "-p", str(gateway.port), "git@127.0.0.1"]
        return Target(
            "gateway",
            lambda n: f"ssh://git@127.0.0.1:{gateway.port}/{n}.git",
            lambda n: gateway.repos / f"{n}.git",
            lambda n: [*upload, f"git-upload-pack '{n}.git'"],
        )

    def probe_crypto(self, argv: list[str]) -> dict[str, str]:
        """One `ssh -v` login: the key exchange, cipher and MAC it negotiated."""
        result = subprocess.run(
            argv, env=self.git_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        found: dict[str, str] = {}
        for line in result.stderr.splitlines():
            if line.startswith("debug1: kex: algorithm: "):
                found["kex"] = line.removeprefix("debug1: kex: algorithm: ")
            elif line.startswith("debug1: kex: server->client cipher: "):
                words = line.split()
                found["cipher"], found["mac"] = words[4], words[6]
        if result.returncode != 0 or "cipher" not in found:
            raise SystemExit(f"could not log in with {argv}: {result.stderr[-500:]}")
        return found

    def git_env(self, target: Target | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.root),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_AUTHOR_NAME": "bench",
            "GIT_AUTHOR_EMAIL": "bench@example.com",
            "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@example.com",
            "GIT_TERMINAL_PROMPT": "0",
        }
        if target is not None and target.ssh is not None:
            env["GIT_SSH_COMMAND"] = " ".join(target.ssh)
        elif hasattr(self, "ssh_base"):
            env["GIT_SSH_COMMAND"] = " ".join(self.ssh_base)
        return env

    def plain_repo(self, name: str) -> Path:
        path = self.plain_root / f"{name}.git"
        run(["git", "init", "-q", "--bare", "-b", "main", str(path)])
        for key, value in git_settings(2 * 1024**3):
            run(["git", "config", key, value], cwd=path)
        return path

    def new_app(self, name: str) -> None:
        self.gateway.cli("app", "create", name, "--owner", "bench")

    # -- measuring --

    def order(self, rep: int) -> list[str]:
        turn = rep % len(self.names)
        return self.names[turn:] + self.names[:turn]  # alternate who goes first

    def timed(self, argv: list[str], target: Target, cwd: Path | None = None) -> float:
        started = time.perf_counter()
        subprocess.run(
            argv,
            cwd=cwd,
            env=self.git_env(target),
            capture_output=True,
            timeout=TIMEOUT,
            check=True,
        )
        return time.perf_counter() - started

    def measure(
        self,
        name: str,
        each: Callable[[Target, int], float | None],
        reps: int | None = None,
        warm: bool = False,
        prepare: Callable[[Target], None] | None = None,
    ) -> Figures:
        """Run each(target, rep) for every target, reps times. The gateway starts every
        repetition with an empty pack cache unless warm: a workload repeated with the
        same request would otherwise measure the cache from its third repetition on."""
        figures = Figures(self.names)
        began = time.monotonic()
        for rep in range(reps or self.s.reps):
            for target_name in self.order(rep):
                target = self.targets[target_name]
                if target_name == "gateway" and not warm:
                    self.gateway.empty_pack_cache()
                if prepare is not None:
                    prepare(target)  # before the CPU snapshot: not part of the figure
                before = cpu_seconds(self.gateway.pid)[0] if target_name == "gateway" else 0.0
                value = each(target, rep)
                if target_name == "gateway":
                    figures.gateway_cpu_s += cpu_seconds(self.gateway.pid)[0] - before
                if value is not None:
                    figures.values[target_name].append(value)
        self.results[name] = figures.summary()
        print(f"  {name}: done ({time.monotonic() - began:.0f}s)", file=sys.stderr, flush=True)
        return figures

    # -- workloads --

    def clone(self, bare: bool, depth: int | None = None) -> Callable[[Target, int], float]:
        def each(target: Target, rep: int) -> float:
            dest = self.work / f"clone-{target.name}-{rep}"
            argv = [
                "git",
                "clone",
                "-q",
                *(["--bare"] if bare else []),
                *([f"--depth={depth}"] if depth else []),
                target.repo_url("bench"),
                str(dest),
            ]
            seconds = self.timed(argv, target)
            shutil.rmtree(dest)
            return seconds

        return each

    def clone_repeat(
        self, depth: int | None = None
    ) -> tuple[Callable[[Target], None], Callable[[Target, int], float]]:
        """A bare clone of a commit cloned twice just before: what CI runners cloning the
        same commit get (with depth: a shallow clone, as CI checkouts usually are). The
        pack cache keeps an answer at its second request, so the gateway serves these
        from it; the other targets run pack-objects again. Returns (warm-up, each)."""
        bare = self.clone(bare=True, depth=depth)
        warmed: set[str] = set()

        def warm_up(target: Target) -> None:
            if target.name not in warmed:
                warmed.add(target.name)
                if target.name == "gateway":
                    self.gateway.empty_pack_cache()
                bare(target, -1)
                bare(target, -2)

        return warm_up, bare

    def repeated(self, name: str, depth: int | None) -> Figures:
        warm_up, each = self.clone_repeat(depth)
        return self.measure(name, each, warm=True, prepare=warm_up)

    def raw_pack(self, target: Target, rep: int) -> float:
        refs = run(
            ["git", "for-each-ref", "--format=%(objectname)"], self.git_env(), self.repo
        ).split()
        wants = sorted(set(refs))
        request = pkt(f"want {wants[0]} side-band-64k ofs-delta no-progress\n")
        request += b"".join(pkt(f"want {sha}\n") for sha in wants[1:]) + b"0000" + pkt("done\n")
        started = time.perf_counter()
        proc = subprocess.Popen(
            target.upload_pack("bench"),
            env=self.git_env(target),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None and proc.stdout is not None  # noqa: S101 - PIPEs
        proc.stdin.write(request)
        proc.stdin.close()
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
        proc.wait(TIMEOUT)
        seconds = time.perf_counter() - started
        self.results.setdefault("raw_pack_bytes", {})[target.name] = total  # type: ignore[index]
        return seconds

    def fetch_incremental(self, target: Target, rep: int) -> float:
        baseline = self.work / "baseline.git"
        if not baseline.exists():
            run(
                [
                    "git",
                    "clone",
                    "-q",
                    "--bare",
                    "--single-branch",
                    "--branch",
                    "bench-base",
                    f"file://{self.repo}",
                    str(baseline),
                ],
                self.git_env(),
            )
        copy = self.work / f"fetch-{target.name}-{rep}.git"
        shutil.copytree(baseline, copy, symlinks=True)
        seconds = self.timed(
            ["git", "fetch", "-q", target.repo_url("bench"), "main:refs/heads/new"], target, copy
        )
        shutil.rmtree(copy)
        return seconds

    def push_initial(self, target: Target, rep: int) -> float:
        name = f"push-{target.name}-{rep}"
        if target.name == "gateway":
            self.new_app(name)
        elif target.name != "gitolite":  # gitolite's were declared in its conf at setup
            self.plain_repo(name)
        return self.timed(["git", "push", "-q", target.repo_url(name), "main"], target, self.repo)

    def push_one(self, target: Target, rep: int) -> float:
        local = self.work / f"one-{target.name}"
        if not local.exists():
            run(["git", "clone", "-q", f"file://{self.repo}", str(local)], self.git_env())
        (local / "bench-change.txt").write_text(f"{target.name} {rep}\n")
        run(["git", "add", "-A"], self.git_env(), local)
        run(["git", "commit", "-qm", f"one {rep}"], self.git_env(), local)
        return self.timed(
            ["git", "push", "-q", target.repo_url(f"push-{target.name}-0"), "HEAD:main"],
            target,
            local,
        )

    def ls_remote_latencies(self, target: Target) -> list[float]:
        return [
            self.timed(["git", "ls-remote", target.repo_url("bench")], target)
            for _ in range(self.s.sequential)
        ]

    def concurrent(self, count: int) -> Callable[[Target, int], float]:
        def each(target: Target, rep: int) -> float:
            started = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [
                        "git",
                        "clone",
                        "-q",
                        "--bare",
                        target.repo_url("bench"),
                        str(self.work / f"cc-{target.name}-{rep}-{i}"),
                    ],
                    env=self.git_env(target),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i in range(count)
            ]
            failures = sum(1 for p in procs if p.wait(TIMEOUT) != 0)
            seconds = time.perf_counter() - started
            key = f"concurrent_{count}_failures"
            failed = self.results.setdefault(key, {t: 0 for t in self.names})
            failed[target.name] += failures  # type: ignore[index]
            for i in range(count):
                shutil.rmtree(self.work / f"cc-{target.name}-{rep}-{i}", ignore_errors=True)
            return seconds

        return each

    def fetch_storm(self) -> None:
        """A push, then the fetch storm that follows it on a platform: `storm` clones at the
        previous commit fetch the pushed one at once; then the same storm again (fresh clones,
        same commit), which a cache of packs can answer. Total wall time per storm, and the
        gateway's CPU per fetch (its own and its git children's)."""
        first, again = Figures(self.names), Figures(self.names)
        cpu: dict[str, list[float]] = {"fetch_storm": [], "fetch_storm_repeat": []}
        began = time.monotonic()
        self.storm_template()  # before the first storm commit exists anywhere
        for rep in range(self.s.concurrent_reps):
            for name in self.order(rep):
                target = self.targets[name]
                commit = self.push_storm_commit(target, rep)
                for label, figures in (("fetch_storm", first), ("fetch_storm_repeat", again)):
                    before = sum(cpu_seconds(self.gateway.pid)) if name == "gateway" else 0.0
                    figures.values[name].append(self.storm(target, f"{label}-{name}-{rep}", commit))
                    if name == "gateway":
                        cpu[label].append(
                            (sum(cpu_seconds(self.gateway.pid)) - before) / self.s.storm
                        )
        for label, figures in (("fetch_storm", first), ("fetch_storm_repeat", again)):
            figures.gateway_cpu_s = sum(cpu[label])
            figures.extra = {
                "fetches": self.s.storm,
                "gateway_cpu_per_fetch_s": round(statistics.median(cpu[label]), 4),
            }
            self.results[label] = figures.summary()
        elapsed = time.monotonic() - began
        print(f"  fetch_storm: done ({elapsed:.0f}s)", file=sys.stderr, flush=True)

    def push_storm_commit(self, target: Target, rep: int) -> str:
        """A new commit on top of main, pushed through the target to branch `storm`."""
        source = self.work / "storm-source"
        if not source.exists():
            run(["git", "clone", "-q", f"file://{self.repo}", str(source)], self.git_env())
        run(["git", "reset", "-q", "--hard", self.head], self.git_env(), source)
        (source / "bench-storm.txt").write_text(f"{target.name} {rep} {secrets.token_hex(8)}\n")
        run(["git", "add", "-A"], self.git_env(), source)
        run(["git", "commit", "-qm", f"storm {target.name} {rep}"], self.git_env(), source)
        self.timed(
            ["git", "push", "-q", "-f", target.repo_url("bench"), "HEAD:storm"], target, source
        )
        return run(["git", "rev-parse", "HEAD"], self.git_env(), source).strip()

    def storm_template(self) -> Path:
        """A clone at main, before any storm commit, that costs nothing to copy: an empty
        repository borrowing (alternates) the objects of a clone made before the first
        storm push, with main as its ref. It asks for the new commit only, as a real clone
        at the previous commit does."""
        template = self.work / "storm-template.git"
        if template.exists():
            return template
        baseline = self.work / "storm-baseline.git"
        run(
            [
                *("git", "clone", "-q", "--bare", "--single-branch", "--branch", "main"),
                *(f"file://{self.repo}", str(baseline)),
            ],
            self.git_env(),
        )
        run(["git", "init", "-q", "--bare", str(template)], self.git_env())
        alternates = template / "objects" / "info" / "alternates"
        alternates.write_text(f"{baseline / 'objects'}\n")
        run(["git", "update-ref", "refs/heads/main", self.head], self.git_env(), template)
        return template

    def storm(self, target: Target, label: str, commit: str) -> float:
        template = self.storm_template()
        clones = [self.work / f"{label}-{i}.git" for i in range(self.s.storm)]
        for clone in clones:
            shutil.copytree(template, clone, symlinks=True)
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                ["git", "fetch", "-q", target.repo_url("bench"), "+storm:refs/heads/storm"],
                cwd=clone,
                env=self.git_env(target),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for clone in clones
        ]
        failures = sum(1 for p in procs if p.wait(TIMEOUT) != 0)
        seconds = time.perf_counter() - started
        failed = self.results.setdefault("fetch_storm_failures", {t: 0 for t in self.names})
        failed[target.name] += failures  # type: ignore[index]
        # A storm that transferred nothing would time nothing: the clones must have fetched
        # the new commit, which their borrowed objects do not hold.
        for clone in clones[:1] if failures == 0 else []:
            fetched = run(["git", "rev-parse", "storm"], self.git_env(), clone).strip()
            borrowed = subprocess.run(
                ["git", "cat-file", "-e", f"{commit}^{{commit}}"],
                cwd=self.work / "storm-baseline.git",
                env=self.git_env(),
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
            if fetched != commit or borrowed.returncode == 0:
                raise SystemExit(f"fetch storm of {target.name}: got {fetched}, not {commit}")
        for clone in clones:
            shutil.rmtree(clone)
        return seconds

    def percentile(self, values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    def ls_remote(self) -> None:
        latencies: dict[str, list[float]] = {t: [] for t in self.names}
        for target_name in self.order(0):
            before = cpu_seconds(self.gateway.pid)[0]
            latencies[target_name] = self.ls_remote_latencies(self.targets[target_name])
            if target_name == "gateway":
                cpu = cpu_seconds(self.gateway.pid)[0] - before
        result: dict[str, object] = {}
        for name, values in latencies.items():
            result[name] = {
                "p50": round(self.percentile(values, 0.5), 4),
                "p99": round(self.percentile(values, 0.99), 4),
                "n": len(values),
            }
        result.update(ratios({n: self.percentile(v, 0.5) for n, v in latencies.items()}))
        result["gateway_cpu_s"] = round(cpu, 3)
        self.results["ls_remote"] = result
        print("  ls_remote: done", file=sys.stderr, flush=True)

    def auth_cost(self) -> None:
        """ls-remote latency through the gateway with FEW_KEYS keys registered and with
        self.s.keys, on each registry. The few-keys samples are taken before and after the
        crowd, and the registries take turns going first, so that the machine drifting
        during the run does not pass for lookup cost."""
        backends = list(self.gateways)
        started = time.perf_counter()
        neighbours = registry.generate_keys(FEW_KEYS - 1)  # beside the benchmark's own key
        crowd = registry.generate_keys(self.s.keys - FEW_KEYS)
        keygen = time.perf_counter() - started
        few: dict[str, list[float]] = {b: [] for b in backends}
        many: dict[str, list[float]] = {b: [] for b in backends}
        seeded: dict[str, float] = {}
        registered: dict[str, int] = {}
        removed: dict[str, float] = {}
        for backend in backends:
            asyncio.run(registry.seed(self.gateways[backend].database, "few", neighbours))
        self._auth_samples(few, 0)
        for backend in backends:
            print(f"  auth_cost: seeding {backend}...", file=sys.stderr, flush=True)
            seeded[backend] = asyncio.run(
                registry.seed(self.gateways[backend].database, "crowd", crowd)
            )
            registered[backend] = asyncio.run(registry.count_keys(self.gateways[backend].database))
        self._auth_samples(many, 1)
        self._auth_samples(many, 0)
        for backend in backends:
            removed[backend] = asyncio.run(
                registry.remove_users(self.gateways[backend].database, "crowd")
            )
        self._auth_samples(few, 1)

        def latency(values: list[float]) -> dict[str, float]:
            return {
                "p50": round(self.percentile(values, 0.5), 4),
                "p99": round(self.percentile(values, 0.99), 4),
                "n": len(values),
            }

        result: dict[str, object] = {
            "keys_few": FEW_KEYS,
            "keys_many": self.s.keys,
            "keygen_s": round(keygen, 2),
        }
        for backend in backends:
            result[backend] = {
                "few": latency(few[backend]),
                "many": latency(many[backend]),
                "keys_registered": registered[backend],  # counted after seeding
                "many/few": round(
                    self.percentile(many[backend], 0.5) / self.percentile(few[backend], 0.5), 3
                ),
                "seed_s": round(seeded[backend], 2),
                "seed_keys_per_s": round(len(crowd) / seeded[backend]) if seeded[backend] else 0,
                "remove_s": round(removed[backend], 2),
            }
        if len(backends) == 2:
            result["postgresql/sqlite"] = {
                side: round(
                    self.percentile(values["postgresql"], 0.5)
                    / self.percentile(values["sqlite"], 0.5),
                    3,
                )
                for side, values in (("few", few), ("many", many))
            }
        self.results["auth_cost"] = result
        print("  auth_cost: done", file=sys.stderr, flush=True)

    def _auth_samples(self, into: dict[str, list[float]], turn: int) -> None:
        backends = list(into)
        for backend in backends[turn % len(backends) :] + backends[: turn % len(backends)]:
            into[backend].extend(self.ls_remote_latencies(self.gateway_targets[backend]))

    def memory(self) -> None:
        before = rss_kib(self.gateway.pid)
        after = asyncio.run(self._hold_connections(self.s.idle_connections))
        self.results["memory"] = {
            "idle_connections": self.s.idle_connections,
            "rss_before_kib": before,
            "rss_with_connections_kib": after,
            "kib_per_connection": round((after - before) / self.s.idle_connections, 1),
        }
        print("  memory: done", file=sys.stderr, flush=True)

    async def _hold_connections(self, count: int) -> int:
        import asyncssh

        key = asyncssh.read_private_key(self.key)
        conns = []
        try:
            for _ in range(count):
                conns.append(
                    await asyncssh.connect(
                        "127.0.0.1",
                        self.gateway.port,
                        username="git",
                        client_keys=[key],
                        known_hosts=None,
                        agent_path=None,
                    )
                )
            await asyncio.sleep(1)  # let the server settle its buffers before reading RSS
            return rss_kib(self.gateway.pid)
        finally:
            for conn in conns:
                conn.close()

    # -- the whole run --

    def workloads(self) -> dict[str, Callable[[], object]]:
        steps: dict[str, Callable[[], object]] = {
            "clone_bare": lambda: self.measure("clone_bare", self.clone(bare=True)),
            "clone_checkout": lambda: self.measure("clone_checkout", self.clone(bare=False)),
            "clone_repeat": lambda: self.repeated("clone_repeat", None),
            "clone_shallow_repeat": lambda: self.repeated("clone_shallow_repeat", 1),
            "raw_pack": lambda: self.measure("raw_pack", self.raw_pack),
            "fetch_incremental": lambda: self.measure("fetch_incremental", self.fetch_incremental),
            "push_initial": lambda: self.measure("push_initial", self.push_initial),
            "push_one_commit": lambda: self.measure("push_one_commit", self.push_one),
            "ls_remote": self.ls_remote,
        }
        for count in self.s.concurrency:

            def concurrent(count: int = count) -> object:
                return self.measure(
                    f"concurrent_{count}", self.concurrent(count), reps=self.s.concurrent_reps
                )

            steps[f"concurrent_{count}"] = concurrent
        steps["fetch_storm"] = self.fetch_storm
        steps["auth_cost"] = self.auth_cost
        steps["memory"] = self.memory
        return steps

    def run_all(self, only: set[str] | None = None) -> None:
        # What each SSH target negotiated with the client git uses: the cipher is the
        # main cost of the transport, and the client's preference picks it.
        self.negotiated["openssh"] = self.probe_crypto(
            [*self.ssh_base, "-v", "-p", str(self.sshd.port), f"{self.user}@127.0.0.1", "true"]
        )
        self.negotiated["openssh_gcm"] = self.probe_crypto(
            [
                *(self.targets["openssh_gcm"].ssh or []),
                *("-v", "-p", str(self.sshd.port), f"{self.user}@127.0.0.1", "true"),
            ]
        )
        if "gitolite" in self.targets:
            # No command: gitolite-shell answers `info` and exits 0.
            self.negotiated["gitolite"] = self.probe_crypto(
                [*self.ssh_base, "-v", "-p", str(self.sshd.port), f"{gitolite.USER}@127.0.0.1"]
            )
        self.negotiated["gateway"] = self.probe_crypto(
            [*self.ssh_base, "-v", "-p", str(self.gateway.port), "git@127.0.0.1"]
        )
        if only and "push_one_commit" in only:
            only.add("push_initial")  # it pushes into the repositories push_initial creates
        for name, step in self.workloads().items():
            if not only or name in only:
                step()
        if "raw_pack" not in self.results:
            return
        medians = self.results["raw_pack"]
        throughput = {}
        for target in self.names:
            seconds = medians[target]["median"]  # type: ignore[index]
            size = self.results["raw_pack_bytes"][target]  # type: ignore[index]
            throughput[target] = round(size / seconds / 1e6, 1)
        self.results["raw_pack_mb_per_s"] = throughput

    def close(self) -> None:
        """Stop whatever setup started, even if it stopped halfway."""
        codes: dict[str, int] = {}
        try:
            if self.sshd is not None:
                self.sshd.stop()
            for backend, gateway in self.gateways.items():
                codes[backend] = gateway.stop()
        finally:
            if self.postgres is not None:
                self.postgres.remove()
            if self.gitolite is not None:
                self.gitolite.remove()
        if codes:
            self.results["gateway_exit_code"] = {"code": codes[self.databases[0]], **codes}


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    git = run(["git", "--version"]).strip()
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=30).stderr.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "git": git,
        "ssh": ssh,
    }


def present(results: dict[str, dict[str, object]]) -> list[str]:
    """The targets that produced figures, in table order."""
    return [t for t in TARGETS if any(isinstance(f.get(t), dict) for f in results.values())]


def rows(results: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """The per-target workload rows (the others are single figures)."""
    return {n: f for n, f in results.items() if isinstance(f.get("gateway"), dict)}


def table(results: dict[str, dict[str, object]]) -> str:
    targets = present(results)
    refs = [t for t in targets if t != "gateway"]
    lines = [
        f"{'workload':<20} "
        + " ".join(f"{t:>20}" for t in targets)
        + " "
        + " ".join(f"{'gw/' + t:>14}" for t in refs)
        + f" {'gw cpu':>7}"
    ]
    for name, figures in rows(results).items():
        cells = []
        for target in targets:
            f = figures.get(target)
            if isinstance(f, dict) and "median" in f:
                cells.append(f"{f['min']:.3f}/{f['median']:.3f}/{f['max']:.3f}")
            elif isinstance(f, dict) and "p50" in f:
                cells.append(f"p50 {f['p50']:.3f} p99 {f['p99']:.3f}")
            else:
                cells.append("-")
        lines.append(
            f"{name:<20} "
            + " ".join(f"{c:>20}" for c in cells)
            + " "
            + " ".join(f"{figures.get('gateway/' + t, '-')!s:>14}" for t in refs)
            + f" {figures.get('gateway_cpu_s', '-')!s:>7}"
        )
    if len(lines) == 1:
        lines = []  # no per-target workload ran (--only auth_cost, say): no empty header
    for name in ("fetch_storm", "fetch_storm_repeat"):
        if name in results:
            lines.append(
                f"{name}: gateway CPU per fetch "
                f"{results[name]['gateway_cpu_per_fetch_s']} s ({results[name]['fetches']} fetches)"
            )
    for name in (
        "raw_pack_mb_per_s",
        "concurrent_8_failures",
        "concurrent_32_failures",
        "fetch_storm_failures",
        "memory",
    ):
        if name in results:
            lines.append(f"{name}: {json.dumps(results[name])}")
    if "auth_cost" in results:
        lines.extend(auth_table(results["auth_cost"]))
    return "\n".join(lines)


def auth_table(auth: dict[str, Any]) -> list[str]:
    """The auth-cost figures, one column per registry."""
    backends = [b for b in DATABASES if b in auth]
    few, many = auth["keys_few"], auth["keys_many"]
    figures: list[dict[str, Any]] = [auth[b] for b in backends]

    def spread(side: str) -> list[str]:
        return [f"{f[side]['p50']:.4f} / {f[side]['p99']:.4f} s" for f in figures]

    rows = [
        (f"p50 / p99, {few} keys", spread("few")),
        (f"p50 / p99, {many:,} keys", spread("many")),
        (f"p50 {many:,} / {few}", [f"{f['many/few']}x" for f in figures]),
        (
            f"seeding {many - few:,} keys",
            [f"{f['seed_s']} s ({f['seed_keys_per_s']:,}/s)" for f in figures],
        ),
        ("removing them", [f"{f['remove_s']} s" for f in figures]),
    ]
    lines = [
        f"auth_cost (git ls-remote through the gateway; {figures[0]['few']['n']} samples each)",
        f"  {'':<26}" + "".join(f"{b:>28}" for b in backends),
    ]
    lines += [f"  {label:<26}" + "".join(f"{c:>28}" for c in cells) for label, cells in rows]
    ratio = auth.get("postgresql/sqlite")
    if isinstance(ratio, dict):
        lines.append(
            f"  postgresql / sqlite p50: {ratio['few']}x with {few} keys, "
            f"{ratio['many']}x with {many:,}"
        )
    lines.append(f"  generating the keys: {auth['keygen_s']} s")
    return lines


def auth_sentence(auth: dict[str, Any]) -> str:
    """The auth-cost figures as one README sentence."""
    parts = [
        f"{backend} {auth[backend]['few']['p50']} s with {auth['keys_few']} keys, "
        f"{auth[backend]['many']['p50']} s with {auth['keys_many']:,} "
        f"({auth[backend]['many/few']}x; seeding {auth[backend]['seed_s']} s)"
        for backend in DATABASES
        if backend in auth
    ]
    return "Auth cost: ls-remote p50 on " + "; on ".join(parts) + "."


def negotiated_line(negotiated: dict[str, dict[str, str] | None]) -> str:
    parts = [
        f"{target} {crypto['cipher']} (MAC {crypto['mac']}, kex {crypto['kex']})"
        for target, crypto in negotiated.items()
        if crypto
    ]
    return "negotiated: " + "; ".join(parts)


def markdown(report: dict[str, object], plot: str | None = None) -> str:
    """The run as a README table: medians (p50 for ls-remote) and ratios, and the plot's
    image if one was written."""
    results: dict[str, dict[str, object]] = report["results"]  # type: ignore[assignment]
    targets = present(results)
    refs = [t for t in targets if t != "gateway"]
    header = [LABELS[t] for t in targets] + [f"gateway / {LABELS[t]}" for t in refs]
    lines = [
        f"| workload | {' | '.join(header)} |",
        "|---" * (len(header) + 1) + "|",
    ]
    for name, figures in rows(results).items():
        cells = []
        for target in targets:
            f = figures[target]
            value = f.get("median", f.get("p50"))  # type: ignore[union-attr]
            cells.append(f"{value:.3f} s")
        cells += [f"{figures[f'gateway/{t}']}x" for t in refs]
        label = name.replace("_", " ") + (" (p50)" if name == "ls_remote" else "")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    mbps: dict[str, float] = results["raw_pack_mb_per_s"]  # type: ignore[assignment]
    auth = results["auth_cost"]
    memory = results["memory"]
    storm, repeat = results["fetch_storm"], results["fetch_storm_repeat"]
    failures = "; ".join(
        f"{name.removesuffix('_failures').replace('_', ' ')} {json.dumps(counts)}"
        for name, counts in results.items()
        if name.endswith("_failures")
    )
    lines.append("")
    lines.append(
        "Raw pack transfer: "
        + ", ".join(f"{mbps[t]} MB/s {LABELS[t]}" for t in targets)
        + " (connection setup included). "
        f"Fetch storm of {storm['fetches']}: gateway CPU per fetch (its own and git's) "
        f"{storm['gateway_cpu_per_fetch_s']} s, {repeat['gateway_cpu_per_fetch_s']} s when "
        f"repeated. Failures: {failures}. {auth_sentence(auth)} Memory: "  # type: ignore[arg-type]
        f"{memory['kib_per_connection']} KiB per idle authenticated connection "  # type: ignore[index]
        f"({memory['idle_connections']} connections)."  # type: ignore[index]
    )
    lines.append("")
    line = negotiated_line(report["negotiated"])  # type: ignore[arg-type]
    lines.append(f"N{line[1:]}.")
    skipped: dict[str, str] = report.get("skipped") or {}  # type: ignore[assignment]
    for target, reason in skipped.items():
        lines.append(f"{LABELS[target]} skipped: {reason}.")
    if plot:
        lines += ["", f"![gateway / each target, per workload]({plot})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small profile and fewer keys: about three minutes"
    )
    parser.add_argument(
        "--profile",
        choices=["tiny", "small", "large"],
        help="repository profile (default: small with --quick, else large; tiny is for the tests)",
    )
    parser.add_argument("--repo", type=Path, help="benchmark this existing repository instead")
    parser.add_argument("--reps", type=int, help="repetitions per workload")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the README table")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated workloads to run")
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="the gateway's registry: SQLite, a PostgreSQL server the benchmark starts, or "
        "both (auth_cost on each, side by side; the other workloads on SQLite)",
    )
    parser.add_argument(
        "--keys",
        type=int,
        help=f"keys registered for auth_cost (default: 100,000, 10,000 with --quick; "
        f"more than {FEW_KEYS})",
    )
    parser.add_argument(
        "--cipher",
        metavar="NAME",
        help="pin the SSH clients to this cipher (ssh -c), e.g. chacha20-poly1305@openssh.com "
        "(the AES-GCM OpenSSH target stays on AES-GCM)",
    )
    parser.add_argument(
        "--no-pack-cache",
        dest="pack_cache",
        action="store_false",
        help="run the gateway with its pack-objects cache off ([git] pack_cache = false; "
        "it is on by default)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="instead of the comparison: concurrent clone throughput of the gateway with 1 "
        "and with N workers (0 = one per CPU core); 4 clones per worker at once",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead of the comparison: two nodes forwarding to each repository's home node "
        "(clone, ls-remote and push through the home and through the other node), then the "
        "failover when the home is killed",
    )
    parser.add_argument(
        "--node-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="[cluster] node_timeout of --cluster's nodes (default 5)",
    )
    args = parser.parse_args(argv)
    if args.profile == "tiny":
        settings = MODES["tiny"]
    else:
        settings = MODES["quick" if args.quick else "full"]
        settings.profile = args.profile or settings.profile
    if args.reps:
        settings.reps = args.reps
    if args.keys is not None:
        if args.keys <= FEW_KEYS:
            parser.error(f"--keys must be more than {FEW_KEYS}")
        settings.keys = args.keys
    databases = DATABASES if args.database == "both" else (args.database,)
    if args.workers is not None:
        return workers_main(args, settings)
    if args.cluster:
        return cluster_main(args, settings)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        bench = Bench(
            settings,
            Path(tmp),
            args.repo.resolve() if args.repo else None,
            args.cipher,
            databases,
            args.pack_cache,
        )
        print(f"setting up ({settings.profile} profile)...", file=sys.stderr, flush=True)
        try:
            bench.setup()
            bench.run_all(set(args.only.split(",")) if args.only else None)
        finally:
            bench.close()
        report = {
            "profile": settings.profile,
            "pack_bytes": bench.pack_bytes,
            "databases": list(databases),
            "postgresql": bench.postgres_info,
            "machine": machine(),
            "elapsed_s": round(time.monotonic() - started, 1),
            "pack_cache": args.pack_cache,
            "targets": bench.names,
            "skipped": bench.skipped,
            "negotiated": bench.negotiated,
            "results": bench.results,
        }
    print(table(bench.results))
    print(negotiated_line(bench.negotiated))
    for target, reason in bench.skipped.items():
        print(f"{LABELS[target]} skipped: {reason}")
    print(
        f"pack {report['pack_bytes'] / 1e6:.1f} MB, {report['elapsed_s']} s, "
        f"{json.dumps(report['machine'])}"
    )
    registries = " and ".join(databases)
    if bench.postgres_info:
        registries += f" (PostgreSQL {bench.postgres_info['version']}, its default settings)"
    print(f"gateway registry: {registries}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown and not args.only:
        written = write_plot(report, Path(args.markdown).with_suffix(".png"))
        Path(args.markdown).write_text(markdown(report, written))
    return 0


def write_plot(report: dict[str, Any], path: Path) -> str | None:
    """The ratios as a PNG beside the markdown table: its file name, or None (one line
    says why) if matplotlib is missing."""
    reason = plot.unavailable()
    if reason is not None:
        print(f"plot: skipped, {reason}")
        return None
    results = report["results"]
    refs = [t for t in present(results) if t != "gateway"]
    ratios = {
        name: {t: figures[f"gateway/{t}"] for t in refs if f"gateway/{t}" in figures}
        for name, figures in rows(results).items()
    }
    title = f"git-gateway benchmark, {report['profile']} profile"
    plot.write(ratios, {t: LABELS[t] for t in refs}, path, title)
    print(f"plot: {path}")
    return path.name


def workers_main(args: argparse.Namespace, settings: Settings) -> int:
    """`--workers N`: the gateway's concurrent clone throughput with 1 and N workers."""
    from gateway.workers import cores

    from . import workers

    count = args.workers or cores()
    if count < 2:
        raise SystemExit("--workers: compare 1 worker with at least 2")
    reps = args.reps or (1 if settings.profile == "tiny" else 5)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        print(f"setting up ({settings.profile} profile)...", file=sys.stderr, flush=True)
        figures = workers.measure(Path(tmp), settings.profile, count, 4 * count, reps)
    report = {
        **figures,
        "machine": machine(),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(workers.report(figures))
    print(f"{report['elapsed_s']} s, {json.dumps(report['machine'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cluster_main(args: argparse.Namespace, settings: Settings) -> int:
    """`--cluster`: what forwarding to a repository's home node adds, and the failover."""
    from . import cluster

    reps = args.reps or (2 if settings.profile == "tiny" else 5)
    started = time.monotonic()
    load = list(os.getloadavg())  # other work on the machine moves these figures
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        print(f"setting up ({settings.profile} profile)...", file=sys.stderr, flush=True)
        figures = cluster.measure(Path(tmp), settings.profile, reps, args.node_timeout, args.cipher)
    report = {
        **figures,
        "machine": machine(),
        "load_average": {"start": load, "end": list(os.getloadavg())},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(cluster.report(figures))
    print(
        f"{report['elapsed_s']} s, load average {load[0]:.2f} at the start, "
        f"{report['load_average']['end'][0]:.2f} at the end, {json.dumps(report['machine'])}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
